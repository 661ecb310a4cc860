"""The README's first command: `evomerge demo`, shrunk to seconds."""

import pytest

from evomerge import demo, demo_problem
from evomerge.cli import main


@pytest.mark.slow
def test_demo_builds_searches_reports_and_resumes(tmp_path, capsys, monkeypatch):
    # The real demo trains for a minute or two and searches for a few; the
    # pipeline is the same with less of everything.
    monkeypatch.setattr(demo_problem, "PRETRAIN", dict(demo_problem.PRETRAIN, steps=20))
    monkeypatch.setattr(demo_problem, "FINETUNE", dict(demo_problem.FINETUNE, steps=5))
    monkeypatch.setattr(demo_problem, "DEV_DOCS", 12)
    monkeypatch.setattr(demo_problem, "HELDOUT_DOCS", 12)
    monkeypatch.setattr(demo, "DEMO_TRIALS", 4)
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
