"""Multi-fidelity scoring (``fidelity:``): each candidate on its own subset of
the dev documents, in rungs, stopped with its difference estimate once the
search's best beats it; with every driver, through a kill -9, and shown by
status and the report. The estimator itself: tests/fitness/test_estimate.py."""

import os
import signal
import subprocess
import sys
import textwrap

import pytest
import yaml
from conftest import N_DOCS
from helpers import driver_settings, search_refused, write_config

from evomerge.app.cli import main
from evomerge.fitness.estimate import Rungs, combine, difference
from evomerge.fitness.evaluate import Evaluator
from evomerge.fitness.paired import signed_weights
from evomerge.fitness.spec import EvalSpec
from evomerge.run.store import RunStore

TWO = [{"task": "sums", "metric": "acc"}, {"task": "sums_heldout", "metric": "acc", "weight": 0.5}]
TASKS = {"sums/acc": "sums", "sums_heldout/acc": "sums_heldout"}


def _evaluator(experiment):
    spec = EvalSpec(include_path="tasks", objectives=TWO, batch_size=32)
    return Evaluator(spec, experiment / "models" / "base", root=experiment)


def _model(experiment, name="expert_a"):
    import transformers

    return transformers.AutoModelForCausalLM.from_pretrained(experiment / "models" / name)


def _rungs(ev, front, key="candidate"):
    predicted = {name: [0.25] * N_DOCS for name in TASKS}
    weights = signed_weights(ev.objectives)
    return Rungs(key=key, seed=0, predicted=predicted, axes=[weights], front=front, fractions=(0.25, 0.5), min_docs=2)


def test_rungs_nothing_beats_score_every_document_and_give_the_full_score(experiment):
    ev = _evaluator(experiment)
    model = _model(experiment)
    full = ev.score(model)
    got = ev.score(model, rungs=_rungs(ev, front=[]))
    assert got.ok and not got.stopped and got.documents == full.documents == 2 * N_DOCS
    # its scores put back in the evaluator's order: the very values of a plain score
    assert got.docs == full.docs and got.values == full.values
    assert got.se is None and got.positions is None


def test_a_beaten_candidate_stops_at_its_first_rung_with_the_difference_estimate(experiment):
    ev = _evaluator(experiment)
    model = _model(experiment)
    full = ev.score(model)
    rungs = _rungs(ev, front=[[10.0]])  # a best no candidate can reach
    got = ev.score(model, rungs=rungs)
    n = N_DOCS // 4
    assert got.ok and got.stopped and got.documents == 2 * n
    estimates = {}
    for name, task in TASKS.items():
        positions = got.positions[task]
        assert positions == rungs.order(task, N_DOCS)[:n]  # its own draw
        # each score is the document's own, as a full score has it
        assert got.docs[name] == [full.docs[name][p] for p in positions]
        estimates[name] = difference(positions, got.docs[name], rungs.predicted[name])
        assert got.values[name] == pytest.approx(estimates[name].value)
        assert got.se[name] == pytest.approx(estimates[name].se) and got.se[name] > 0
    # another candidate draws other documents
    other = ev.score(model, rungs=_rungs(ev, front=[[10.0]], key="another"))
    assert other.positions != got.positions
    assert combine(estimates, signed_weights(ev.objectives)).value == pytest.approx(
        sum(w * got.values[k] for k, w in signed_weights(ev.objectives).items())
    )


def _config(experiment, name, driver="random", trials=8, **overrides):
    settings = driver_settings(driver, popsize=4, n_startup_trials=3)
    eval_ = {"include_path": "tasks", "objectives": TWO, "batch_size": 32}
    fidelity = {"enabled": True, "rungs": [0.25, 0.5], "z": 0.0, "min_docs": 2}
    return write_config(
        experiment,
        name,
        eval=eval_,
        heldout=None,
        fidelity=fidelity,
        driver=settings,
        budget={"trials": trials},
        **overrides,
    )


def _check_fidelity_run(run_dir):
    store = RunStore.open(run_dir)
    search = [r for r in store.trials("search") if r.ok and not r.cached]
    stopped = [r for r in search if r.stopped]
    assert stopped, "with z = 0 a candidate below the best at its first rung stops"
    for r in stopped:
        sizes = {task: len(p) for task, p in r.positions.items()}
        assert set(sizes.values()) <= {N_DOCS // 4, N_DOCS // 2} and r.documents == sum(sizes.values())
        assert all(len(r.docs[name]) == sizes[task] for name, task in TASKS.items())
        assert r.fitness_se > 0 and set(r.se) == set(TASKS)
    for r in search:
        if not r.stopped:  # complete: every document, in the evaluator's order, no estimate
            assert r.documents == 2 * N_DOCS and r.positions is None and r.fitness_se is None
    best, _ = store.chosen()
    assert best.complete and best.documents in (None, 2 * N_DOCS) and not best.stopped
    return store


@pytest.mark.slow
@pytest.mark.parametrize("driver", ["cma", "tpe", "gp", "cmaes", "random", "nsga2"])
def test_a_fidelity_search_stops_candidates_on_their_own_documents_with_every_driver(experiment, tmp_path, driver):
    config = _config(experiment, f"fidelity_{driver}.yaml", driver=driver)
    run_dir = tmp_path / "run"
    assert main(["search", str(config), "--run-dir", str(run_dir), "--no-progress"]) == 0
    store = _check_fidelity_run(run_dir)
    for r in store.trials("search"):
        if r.ok and r.stopped and driver != "nsga2":
            assert r.told == [pytest.approx(r.fitness)]  # the driver was told the estimate
        elif r.ok and r.stopped:
            assert r.told == [pytest.approx(r.values[name]) for name in TASKS]


@pytest.mark.slow
def test_status_and_report_show_documents_estimates_and_their_error(experiment, tmp_path, capsys):
    config = _config(experiment, "fidelity_status.yaml", trials=6)
    run_dir = tmp_path / "run"
    assert main(["search", str(config), "--run-dir", str(run_dir), "--no-progress"]) == 0
    store = RunStore.open(run_dir)
    capsys.readouterr()
    assert main(["status", str(run_dir), "--top", "20"]) == 0
    out = capsys.readouterr().out
    assert "docs" in out.splitlines()[2].split() and "per candidate" in out
    for r in store.trials("search"):
        if r.ok and r.stopped and not r.cached:
            row = next(line for line in out.splitlines() if line.split()[:2] == ["~", str(r.number)])
            assert f"{r.fitness:.4f} ±{1.96 * r.fitness_se:.4f}" in row and f" {r.documents} " in f" {row} "
    report = tmp_path / "report.html"
    assert main(["report", str(run_dir), "--out", str(report)]) == 0
    html = report.read_text()
    stopped = next(r for r in store.trials("search") if r.ok and r.stopped)
    assert f"±{1.96 * stopped.fitness_se:.4f}" in html and "per candidate" in html


def test_fidelity_and_early_stopping_are_one_choice_and_bad_settings_are_refused(experiment, capsys):
    for overrides, fragment in [
        ({"early_stop": {"enabled": True}}, "early_stop and fidelity are both enabled"),
        ({"fidelity": {"enabled": True, "rungs": [0.5, 1.5]}}, "rungs"),
        ({"fidelity": {"enabled": True, "z": -1}}, "z"),
    ]:
        overrides = {"fidelity": {"enabled": True}, **overrides}
        config = write_config(experiment, "bad_fidelity.yaml", **overrides)
        search_refused(capsys, config, experiment / "never", fragment)


def test_fidelity_does_not_change_the_config_fingerprint(experiment):
    from evomerge.run.config import load_config

    plain = load_config(write_config(experiment, "fp_plain.yaml"))[0]
    other = load_config(write_config(experiment, "fp_fid.yaml", fidelity={"enabled": True, "z": 2}))[0]
    assert plain.fingerprint() == other.fingerprint()


@pytest.mark.slow
def test_a_fidelity_search_killed_with_sigkill_resumes_and_keeps_every_scored_document(experiment, tmp_path):
    config = _config(experiment, "fidelity_kill.yaml", trials=10)
    run_dir = tmp_path / "run"
    script = textwrap.dedent(
        f"""
        import os, signal, sys
        from evomerge.run.executors import worker
        score, seen = worker.Worker.score, []
        def dying(self, recipe, job="dev"):
            if worker.Job.of(job).rungs is not None:
                seen.append(1)
                if len(seen) == 6:
                    os.kill(os.getpid(), signal.SIGKILL)
            return score(self, recipe, job)
        worker.Worker.score = dying
        from evomerge.app.cli import main
        sys.exit(main(["search", {str(config)!r}, "--run-dir", {str(run_dir)!r}, "--no-progress"]))
        """
    )
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, timeout=600)
    assert proc.returncode == -signal.SIGKILL, proc.stderr.decode()[-2000:]
    before = {r.number: r for r in RunStore.open(run_dir).trials("search") if r.ok}
    assert len(before) == 5  # five candidates scored and recorded before the sixth was killed

    assert main(["search", str(config), "--run-dir", str(run_dir), "--no-progress"]) == 0
    store = _check_fidelity_run(run_dir)
    after = {r.number: r for r in store.trials("search") if r.ok}
    assert len([r for r in store.trials("search") if r.status == "ok"]) == 10
    for number, r in before.items():  # every scored document kept, as it was
        got = after[number]
        assert (got.docs, got.positions, got.fitness, got.fitness_se) == (r.docs, r.positions, r.fitness, r.fitness_se)


@pytest.mark.slow
def test_only_fully_scored_candidates_enter_the_selection_race(experiment, tmp_path):
    config = _config(experiment, "fidelity_race.yaml", trials=8, select={"top": 3, "min_docs": 2})
    data = yaml.safe_load(config.read_text())
    data["eval"]["samples"] = N_DOCS // 2  # the other half for the race
    config.write_text(yaml.safe_dump(data))
    run_dir = tmp_path / "run"
    assert main(["search", str(config), "--run-dir", str(run_dir), "--no-progress"]) == 0
    store = RunStore.open(run_dir)
    race = store.race()
    assert race["winner"] is not None and race["entrants"]
    stopped = {r.number for r in store.trials("search") if r.stopped}
    assert stopped and not stopped & set(race["entrants"])
    assert store.chosen()[0].complete
