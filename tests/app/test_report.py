"""`evomerge report`: the HTML page of a run, on real tiny searches."""

import base64
import io
import os
import re
import shutil
import subprocess
import sys
from html.parser import HTMLParser

import optuna
import pytest
import torch
import yaml
from helpers import write_config
from PIL import Image

from evomerge.app.cli import main
from evomerge.app.report import layer_rows
from evomerge.run.run import Run


class Page(HTMLParser):
    """The images and table rows of a report."""

    def __init__(self, text: str):
        super().__init__()
        self.images: dict[str, str] = {}  # id -> src
        self.rows: list[tuple[str | None, list[str]]] = []  # (data-trial, cells)
        self._cell: list[str] | None = None
        self.feed(text)

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag == "img":
            self.images[a.get("id")] = a.get("src", "")
        elif tag == "tr":
            self.rows.append((a.get("data-trial"), []))
        elif tag in ("td", "th"):
            self._cell = []

    def handle_data(self, data):
        if self._cell is not None:
            self._cell.append(data)

    def handle_endtag(self, tag):
        if tag in ("td", "th") and self._cell is not None:
            text = "".join(self._cell).strip()
            self.rows[-1][1].append(text)
            self._cell = None


def report(run_dir, capsys) -> tuple[str, Page]:
    assert main(["report", str(run_dir)]) == 0
    out = run_dir / "report.html"
    assert capsys.readouterr().out.strip() == f"wrote {out}"
    text = out.read_text()
    return text, Page(text)


def png_size(src: str) -> tuple[int, int]:
    """The size of a data-URI PNG, decoded for real."""
    prefix = "data:image/png;base64,"
    assert src.startswith(prefix)
    data = base64.b64decode(src[len(prefix) :])
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    with Image.open(io.BytesIO(data)) as image:
        image.load()
        return image.size


def study_of(run_dir):
    """The run's study, read with Optuna alone."""
    return optuna.load_study(study_name="evomerge", storage=f"sqlite:///{run_dir / 'study.db'}")


def complete(study, kind=None):
    return [
        t
        for t in study.get_trials(states=(optuna.trial.TrialState.COMPLETE,))
        if kind is None or t.user_attrs.get("kind") == kind
    ]


@pytest.fixture(scope="module")
def single_run(experiment, tmp_path_factory):
    """Layer-wise task arithmetic, one objective; the first search candidate
    runs out of memory and one trial was interrupted (left FAIL in the study)."""
    run_dir = tmp_path_factory.mktemp("report") / "single"
    run = Run(write_config(experiment, "report_single.yaml", budget={"trials": 4}), run_dir, progress=False)
    real, calls = run.worker.merger.apply, []

    def flaky(recipe):
        calls.append(1)
        if len(calls) == 1:
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        return real(recipe)

    try:
        run.run_baselines()
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(run.worker.merger, "apply", flaky)
            run.search()
        run.store.study.add_trial(
            optuna.trial.create_trial(state=optuna.trial.TrialState.FAIL, user_attrs={"status": "interrupted"})
        )
    finally:
        run.close()
    return run_dir


@pytest.fixture(scope="module")
def nsga_run(experiment, tmp_path_factory):
    """NSGA-II on accuracy (maximised) and perplexity (minimised); no baselines
    (to keep the test fast), no held-out set."""
    objectives = [{"task": "sums", "metric": "acc"}, {"perplexity": "tasks/sums.jsonl", "direction": "minimize"}]
    config = write_config(
        experiment,
        "report_nsga.yaml",
        driver={"name": "nsga2", "popsize": 4},
        budget={"trials": 6},
        heldout=None,
        baselines=False,
        eval={"include_path": "tasks", "objectives": objectives, "batch_size": 32, "samples": 16},
    )
    run_dir = tmp_path_factory.mktemp("report") / "nsga"
    assert main(["search", str(config), "--run-dir", str(run_dir), "--no-progress"]) == 0
    return run_dir


@pytest.fixture(scope="module")
def route_run(experiment, tmp_path_factory):
    """Layer routing (the paper's data-flow space), no merge; no baselines."""
    config = write_config(experiment, "report_route.yaml", space="dfs_paper", budget={"trials": 4}, baselines=False)
    run_dir = tmp_path_factory.mktemp("report") / "route"
    assert main(["search", str(config), "--run-dir", str(run_dir), "--no-progress"]) == 0
    return run_dir


def test_report_of_a_single_objective_run(single_run, capsys):
    text, page = report(single_run, capsys)
    # progress, dev against held-out, the recipe per layer; no Pareto front, no route
    assert set(page.images) == {"fig-progress", "fig-heldout", "fig-recipe"}
    for src in page.images.values():
        width, height = png_size(src)
        assert width > 100 and height > 100
    # the top-trials table starts with the best search trial, as Optuna has it
    study = study_of(single_run)
    ok = [t for t in complete(study, "search") if t.user_attrs["status"] == "ok"]
    best = max(ok, key=lambda t: (t.values[0], -t.number))
    top = [(trial, cells) for trial, cells in page.rows if cells and cells[0] == "1"]
    assert top[0][0] == str(best.number)
    assert top[0][1][1] == str(best.number) and top[0][1][2] == f"{best.values[0]:.4f}"
    # failed and interrupted trials are counted; the failure's reason is listed
    failed = [t for t in complete(study, "search") if t.user_attrs["status"] == "failed"]
    assert len(failed) == 1
    cached = sum(1 for t in ok if t.user_attrs.get("cached"))
    assert f"{len(ok) + 1} search trials: {len(ok)} scored ({cached} from the cache), 1 failed" in text
    assert "not complete in the study: 1 fail" in text
    reason = next(cells for trial, cells in page.rows if trial == str(failed[0].number) and len(cells) == 2)
    assert "out of memory" in reason[1].lower()
    # every baseline is listed with its dev and held-out scores
    for t in complete(study, "baseline"):
        row = next(cells for trial, cells in page.rows if trial == str(t.number) and t.user_attrs["name"] in cells)
        assert f"{t.values[0]:.4f}" in row and f"{t.user_attrs['heldout_fitness']:.4f}" in row
    # run metadata from run.yaml
    record = yaml.safe_load((single_run / "run.yaml").read_text())
    assert record["config_fingerprint"] in text and "name: cma" in text and "trials: 4" in text


def test_report_out_option_writes_elsewhere(single_run, tmp_path):
    out = tmp_path / "pages" / "run.html"
    assert main(["report", str(single_run), "--out", str(out)]) == 0
    assert len(Page(out.read_text()).images) == 3


def test_multi_objective_report_draws_the_pareto_front(nsga_run, capsys):
    text, page = report(nsga_run, capsys)
    assert "fig-pareto" in page.images and png_size(page.images["fig-pareto"])[0] > 100
    study = study_of(nsga_run)
    assert len(study.directions) == 2
    assert all(t.user_attrs["status"] == "ok" for t in complete(study))
    # the table's Pareto column agrees with Optuna's own front
    front = {t.number for t in study.best_trials}
    assert front
    # rank, trial, fitness, docs, the two objectives, selection, held-out, Pareto, status, recipe
    table = [(trial, cells) for trial, cells in page.rows if trial and len(cells) == 11]
    assert len(table) == len(complete(study, "search"))
    for trial, cells in table:
        assert (cells[8] == "yes") == (int(trial) in front), (trial, cells)
    assert "sums/acc" in text and "perplexity:tasks/sums.jsonl" in text


def test_routing_report_draws_the_route(route_run, capsys):
    text, page = report(route_run, capsys)
    assert "fig-route" in page.images and "fig-pareto" not in page.images
    assert png_size(page.images["fig-route"])[0] > 100
    # a route-only recipe has no per-layer weights: said, not drawn
    assert "fig-recipe" not in page.images and "it has no per-layer weights" in text
    study = study_of(route_run)
    best = max(
        (t for t in complete(study, "search") if t.user_attrs["status"] == "ok"), key=lambda t: (t.values[0], -t.number)
    )
    steps = len(best.user_attrs["recipe"]["route"]["layers"])
    assert f"{steps} layers in order" in text


def test_layer_rows_follow_mergekit_gradients():
    recipe = {
        "method": "slerp",
        "base_model": "models/a",
        "sources": [{"model": "models/a"}, {"model": "models/b", "parameters": {"weight": 0.7, "flag": True}}],
        "parameters": {"t": [{"filter": "self_attn", "value": [0.0, 1.0]}, {"value": [1.0, 0.5, 0.0]}]},
    }
    rows = dict(layer_rows(recipe, 5))
    # a list of k values spreads linearly over the layers; filters get a row each; booleans are left out
    assert rows["all models: t [self_attn]"] == [0.0, 0.25, 0.5, 0.75, 1.0]
    assert rows["all models: t [rest]"] == [1.0, 0.75, 0.5, 0.25, 0.0]
    assert rows["b: weight"] == [0.7] * 5
    assert len(rows) == 3


@pytest.mark.parametrize("case", ["missing", "empty", "not_ready"])
def test_bad_run_folders_are_refused(tmp_path, capsys, case):
    run_dir = tmp_path / "run"
    if case != "missing":
        run_dir.mkdir()
    if case == "not_ready":
        (run_dir / "run.yaml").write_text(yaml.safe_dump({"storage": f"sqlite:///{run_dir / 'study.db'}"}))
    before = sorted(tmp_path.rglob("*"))
    assert main(["report", str(run_dir)]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and err.startswith("evomerge: error:")
    fragment = {"missing": "does not exist", "empty": "holds no evomerge run", "not_ready": "has no study yet"}[case]
    assert fragment in err
    assert sorted(tmp_path.rglob("*")) == before  # nothing written


def test_the_report_renders_in_headless_chromium(request, tmp_path, capsys):
    chromium = shutil.which("chromium")
    if chromium is None:
        if os.environ.get("EVOMERGE_REQUIRE_CHROMIUM") == "1":
            pytest.fail("chromium is not on PATH and EVOMERGE_REQUIRE_CHROMIUM=1; apt-get install chromium")
        pytest.skip("chromium is not installed")
    for run_dir in (request.getfixturevalue("nsga_run"), request.getfixturevalue("route_run")):
        _, page = report(run_dir, capsys)
        profile = tmp_path / f"profile-{run_dir.name}"
        flags = "--headless --no-sandbox --disable-gpu --disable-quic --no-first-run --disable-background-networking"
        flags += " --disable-component-update --disable-sync --virtual-time-budget=5000"
        cmd = [chromium, *flags.split(), f"--user-data-dir={profile}", "--dump-dom", (run_dir / "report.html").as_uri()]
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, done.stderr[-2000:]
        dom = done.stdout
        # the page's script ran on load: every image decoded and has a width; no script or load error
        shown = re.search(r'<body[^>]*data-images="(\d+)/(\d+)"', dom)
        assert shown, dom[:500]
        assert int(shown.group(1)) == int(shown.group(2)) == len(page.images) >= 3
        errors = re.search(r'<html[^>]*data-errors="([^"]*)"', dom)
        assert errors is None, errors.group(1)


def test_importing_the_report_module_stays_light():
    code = (
        "import sys, evomerge.app.report, evomerge.app.cli\n"
        "heavy = [m for m in ('matplotlib', 'optuna', 'ray', 'lm_eval', 'cma', 'torch') if m in sys.modules]\n"
        "assert not heavy, heavy\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)
