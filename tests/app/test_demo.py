"""The README's first command: `evomerge demo`, shrunk to seconds."""

import pytest
import torch

from evomerge.app.cli import main
from evomerge.app.demo import problem as demo_problem
from evomerge.app.demo import run as demo


def _shrink(monkeypatch):
    # The real demo trains for a minute or two and searches for a few; the
    # pipeline is the same with less of everything.
    monkeypatch.setattr(demo_problem, "PRETRAIN", dict(demo_problem.PRETRAIN, steps=20))
    monkeypatch.setattr(demo_problem, "FINETUNE", dict(demo_problem.FINETUNE, steps=5))
    monkeypatch.setattr(demo_problem, "DEV_DOCS", 12)
    monkeypatch.setattr(demo_problem, "HELDOUT_DOCS", 12)
    monkeypatch.setattr(demo, "DEMO_TRIALS", 4)


@pytest.mark.slow
def test_demo_builds_searches_reports_and_resumes(tmp_path, capsys, monkeypatch):
    _shrink(monkeypatch)
    workdir = tmp_path / "demo"
    code = main(["demo", "--workdir", str(workdir), "--no-progress"])
    out = capsys.readouterr().out
    assert code in (0, 1)  # 1: the shrunk search did not beat every baseline on held-out data
    assert "held-out accuracy" in out and "source expert" in out and "ties (density 0.5)" in out
    assert (workdir / "best_recipe.yaml").is_file()
    stamp = (workdir / "models" / "base" / "model.safetensors").stat().st_mtime_ns
    # Again: models are cached and the finished run is only reported.
    assert main(["demo", "--workdir", str(workdir), "--no-progress"]) == code
    assert (workdir / "models" / "base" / "model.safetensors").stat().st_mtime_ns == stamp
    assert "4 search trials" in capsys.readouterr().out


@pytest.mark.slow
def test_the_demo_writes_a_log_of_short_lines_when_its_output_is_not_a_terminal(tmp_path, capfd, monkeypatch):
    """`evomerge demo > log 2>&1`: progress as plain lines, no carriage returns."""
    _shrink(monkeypatch)
    code = main(["demo", "--workdir", str(tmp_path / "demo")])  # progress on; the captured output is no terminal
    log = "".join(capfd.readouterr())
    assert code in (0, 1)
    assert "\r" not in log
    lines = log.splitlines()
    assert any(line.startswith("search:") for line in lines)  # the search's progress, as lines
    assert max(len(line) for line in lines) < 300, max(lines, key=len)


def test_build_once_builds_models_once_and_only_rewrites_tasks_when_the_folder_moved(tmp_path):
    """The build-once logic of the demo and of benchmarks/gen_problem.py."""
    assets = demo_problem.DemoAssets(
        base=tmp_path / "models" / "base",
        experts=[tmp_path / "models" / "expert_a"],
        tasks_dir=tmp_path / "tasks",
        dev_tasks=["t"],
        heldout_tasks=[],
    )
    stamp = tmp_path / "stamp.json"
    calls, threads = [], []

    def build(models):
        calls.append(models)
        threads.append(torch.get_num_threads())
        for p in [assets.base, *assets.experts] if models else []:
            p.mkdir(parents=True, exist_ok=True)
            (p / "model.safetensors").write_bytes(b"")
        assets.tasks_dir.mkdir(exist_ok=True)
        (assets.tasks_dir / "t.yaml").write_text("task: t\n")

    original = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        assert demo_problem.build_once(stamp, 1, assets, build) is assets
        assert threads == [1] and torch.get_num_threads() == 2  # built on one thread: the same models anywhere
    finally:
        torch.set_num_threads(original)
    assert demo_problem.build_once(stamp, 1, assets, build) is assets
    assert calls == [True]
    stamp.write_text(stamp.read_text().replace(str(tmp_path), "/elsewhere"))  # built in another folder
    demo_problem.build_once(stamp, 1, assets, build)
    assert calls == [True, False]
    demo_problem.build_once(stamp, 2, assets, build)  # a new version
    assert calls == [True, False, True]
    (assets.experts[0] / "model.safetensors").unlink()
    demo_problem.build_once(stamp, 2, assets, build)
    assert calls == [True, False, True, True]

    def interrupted(models):
        raise KeyboardInterrupt

    (assets.base / "model.safetensors").unlink()
    with pytest.raises(KeyboardInterrupt):
        demo_problem.build_once(stamp, 2, assets, interrupted)
    assert not stamp.exists()  # an interrupted build must not look finished


def test_the_demo_refuses_a_workdir_it_cannot_build_in(tmp_path, capsys):
    a_file = tmp_path / "a_file"
    a_file.write_text("not a folder")
    assert main(["demo", "--workdir", str(a_file), "--no-progress"]) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if "error" in line]
    assert len(err) == 1 and "is a file" in err[0] and "--workdir" in err[0]
    assert a_file.read_text() == "not a folder"
