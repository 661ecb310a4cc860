"""Trusting the winner: per-document scores, the selection split and race,
early stopping against the incumbent."""

import math
import os
import signal
import subprocess
import sys
import textwrap

import pytest
from conftest import N_DOCS
from helpers import write_config

from evomerge.app.cli import main
from evomerge.errors import EvomergeError
from evomerge.fitness.evaluate import Evaluator
from evomerge.fitness.paired import fitness, paired, signed_weights
from evomerge.fitness.race import Entrant, plan
from evomerge.fitness.score import Versus
from evomerge.fitness.spec import EvalSpec
from evomerge.run.store import RunStore

SELECT_DOCS = N_DOCS // 2  # eval takes half of each task's documents, selection the rest


def _spec(**kw):
    return EvalSpec(include_path="tasks", objectives=[{"task": "sums", "metric": "acc"}], batch_size=32, **kw)


def _model(experiment, name="expert_a"):
    import transformers

    return transformers.AutoModelForCausalLM.from_pretrained(experiment / "models" / name)


# -- per-document scores and parts ------------------------------------------------


def test_per_document_scores_add_up_to_the_metric_and_parts_are_slices(experiment):
    ev = Evaluator(_spec(), experiment / "models" / "base", root=experiment)
    assert ev.per_doc and sorted(ev.order["sums"]) == list(range(N_DOCS))
    model = _model(experiment)
    full = ev.score(model)
    docs = full.docs["sums/acc"]
    assert len(docs) == N_DOCS and full.documents == N_DOCS
    assert sum(docs) / len(docs) == pytest.approx(full.values["sums/acc"])
    part = ev.score(model, part={"sums": (5, 13)})
    assert part.docs["sums/acc"] == docs[5:13] and part.documents == 8
    assert part.values["sums/acc"] == pytest.approx(sum(docs[5:13]) / 8)


def test_objectives_without_per_document_scores_fall_back_to_plain_means(experiment):
    (experiment / "ppl.txt").write_text("one two three four five six seven eight " * 20)
    spec = EvalSpec(objectives=[{"perplexity": "ppl.txt"}], samples=2)
    ev = Evaluator(spec, experiment / "models" / "base", root=experiment)
    assert not ev.per_doc
    score = ev.score(_model(experiment), versus=Versus({"perplexity:ppl.txt": [1.0] * 4}))
    assert score.ok and score.docs is None and not score.stopped and math.isfinite(score.values["perplexity:ppl.txt"])


# -- the selection split -----------------------------------------------------------


def test_selection_documents_are_disjoint_from_the_dev_documents(experiment):
    from evomerge.run.executors.worker import build_evaluators

    spec = _worker_spec(experiment, eval={**_spec(samples=SELECT_DOCS).model_dump(), "seed": 3})
    _, dev, heldout, select = build_evaluators(spec, "cpu")
    assert len(dev.order["sums"]) == SELECT_DOCS
    assert len(select.order["sums"]) == N_DOCS - SELECT_DOCS
    assert not set(select.order["sums"]) & set(dev.order["sums"])
    # a larger `samples` extends the same order, so a race can continue on more documents
    fewer = build_evaluators(_worker_spec(experiment, select={"samples": 5}), "cpu")[3]
    more = build_evaluators(_worker_spec(experiment, select={"samples": 9}), "cpu")[3]
    assert more.order["sums"][:5] == fewer.order["sums"]


def test_selection_needs_documents_that_eval_leaves(experiment, capsys):
    config = write_config(experiment, "select_all.yaml", select={"top": 2})  # eval scores every document
    assert main(["search", str(config), "--run-dir", str(experiment / "never"), "--no-progress"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "no documents left for selection" in err and "eval.samples" in err
    assert not (experiment / "never").exists()


def _worker_spec(experiment, **overrides):
    from evomerge.run.config import SearchConfig
    from evomerge.run.executors.worker import WorkerSpec

    config = {
        "models": ["models/expert_a"],
        "space": "linear",
        "eval": _spec(samples=SELECT_DOCS).model_dump(),
        "select": {},
        **overrides,
    }
    cfg = SearchConfig.model_validate(config)
    return WorkerSpec(
        config=cfg.model_dump(mode="json"),
        root=str(experiment),
        tokenizer=str(experiment / "models" / "base"),
        template=None,
    )


# -- early stopping -------------------------------------------------------------------


def test_early_stopping_never_stops_the_incumbents_own_rescore(experiment):
    ev = Evaluator(_spec(), experiment / "models" / "base", root=experiment)
    model = _model(experiment)
    mine = ev.score(model)
    again = ev.score(model, versus=Versus(mine.docs, alpha=0.49, looks=(0.25, 0.5), min_docs=2))
    assert not again.stopped and again.documents == N_DOCS
    assert again.docs == mine.docs and again.values == mine.values


def test_early_stopping_stops_a_clearly_worse_candidate_with_the_paired_estimate(experiment):
    two = [{"task": "sums", "metric": "acc"}, {"task": "sums_heldout", "metric": "acc", "weight": 0.5}]
    ev = Evaluator(EvalSpec(include_path="tasks", objectives=two), experiment / "models" / "base", root=experiment)
    # an incumbent that gets every document right on one task, and every other one on the other
    incumbent = {"sums/acc": [1.0] * N_DOCS, "sums_heldout/acc": [float(i % 2) for i in range(N_DOCS)]}
    score = ev.score(_model(experiment), versus=Versus(incumbent, alpha=0.05, looks=(0.5,), min_docs=4))
    assert score.stopped and score.documents == N_DOCS  # half of each task's documents
    for name, theirs in incumbent.items():
        part = score.docs[name]
        assert len(part) == N_DOCS // 2
        # the incumbent's full mean plus the paired difference on the documents scored
        expected = sum(theirs) / N_DOCS + sum(part) / len(part) - sum(theirs[: len(part)]) / len(part)
        assert score.values[name] == pytest.approx(expected)


def test_paired_test_and_fitness():
    weights = {"a": 1.0, "b": -2.0}
    x = {"a": [1, 0, 1, 1], "b": [0.5, 0.5, 0.5, 0.5]}
    y = {"a": [0, 0, 1, 0], "b": [0.5, 0.5, 0.5, 0.5]}
    assert fitness(x, weights) == pytest.approx(0.75 - 1.0)
    test = paired(x, y, weights)
    assert test.diff == pytest.approx(0.5) and test.se > 0 and test.p_worse > 0.5
    assert paired(x, x, weights).p_worse == 0.5  # equal: never "worse"
    assert signed_weights([EvalSpec(objectives=[{"task": "t", "metric": "acc"}]).objectives[0]]) == {"t/acc": 1.0}


# -- the race --------------------------------------------------------------------------


def _docs(rate, n):
    return {"o": [1.0 if (i * rate) % 1 < rate else 0.0 for i in range(n)]}


def test_race_halves_on_growing_documents_and_resumes_from_what_is_stored():
    entrants = [Entrant(i, dev=1.0 - i / 100) for i in range(5)]
    quality = {0: 0.3, 1: 0.9, 2: 0.5, 3: 0.7, 4: 0.1}
    full = {i: _docs(q, 40)["o"] for i, q in quality.items()}
    stored, asked = {}, []
    while True:
        step = plan(entrants, stored, {"t": 40}, {"o": "t"}, {"o": 1.0}, min_docs=4)
        if not step.needs:
            break
        for number, part in step.needs.items():
            lo, hi = part["t"]
            asked.append((number, lo, hi))
            have = stored.get(number, {"docs": {"o": []}})["docs"]["o"]
            assert len(have) == lo  # only what is missing
            stored[number] = {"docs": {"o": have + full[number][lo:hi]}}
    assert step.winner == 1
    assert [r["documents"] for r in step.rounds] == [10, 20, 40]  # 3 rounds for 5 entrants
    assert [len(r["kept"]) for r in step.rounds] == [3, 2, 2]
    assert 4 not in step.rounds[0]["kept"]
    assert sum(hi - lo for _, lo, hi in asked) < 5 * 40  # halving spends fewer documents than scoring all
    # stored results are reused: the same plan asks nothing more
    assert not plan(entrants, stored, {"t": 40}, {"o": "t"}, {"o": 1.0}, min_docs=4).needs
    # more selection documents later: the race continues on them
    more = plan(entrants, stored, {"t": 80}, {"o": "t"}, {"o": 1.0}, min_docs=4)
    assert more.needs and all(part["t"][0] == len(stored[n]["docs"]["o"]) for n, part in more.needs.items())
    assert more.needs[0]["t"] == (10, 20)  # round one now takes 20 of the 80 documents


def test_race_drops_failed_entrants_and_falls_back_to_one_round_without_documents():
    entrants = [Entrant(0, 1.0), Entrant(1, 0.5)]
    stored = {0: {"failed": "out of memory"}, 1: {"docs": {"o": [1.0, 0.0, 1.0, 1.0]}}}
    assert plan(entrants, stored, {"t": 4}, {"o": "t"}, {"o": 1.0}, min_docs=1).winner == 1
    plain = plan(entrants, {}, {"t": 4}, {}, {"o": 1.0})
    assert plain.needs == {0: None, 1: None}
    stored = {0: {"values": {"o": 0.2}}, 1: {"values": {"o": 0.4}}}
    assert plan(entrants, stored, {"t": 4}, {}, {"o": 1.0}).winner == 1


# -- a search with a race, and a kill -9 in the middle of it ------------------------------


def _race_config(experiment, name):
    return write_config(
        experiment,
        name,
        eval={**_spec(samples=SELECT_DOCS).model_dump(exclude_none=True)},
        select={"top": 4, "min_docs": 2},
        early_stop={"enabled": True, "alpha": 0.2, "looks": [0.5], "min_docs": 2},
        budget={"trials": 8},
    )


@pytest.mark.slow
def test_race_survives_kill_9_and_continues_where_it_stopped(experiment, tmp_path, monkeypatch):
    from evomerge.run.executors import worker

    config = _race_config(experiment, "race.yaml")
    asked = []
    score = worker.Worker.score

    def counting(self, recipe, job="dev"):
        if worker.Job.of(job).which == "select":
            asked.append(worker.Job.of(job).part)
        return score(self, recipe, job)

    monkeypatch.setattr(worker.Worker, "score", counting)
    fresh = tmp_path / "fresh"
    assert main(["search", str(config), "--run-dir", str(fresh), "--no-progress"]) == 0
    race = RunStore.open(fresh).race()
    total = len(asked)
    assert race["winner"] is not None and len(race["rounds"]) >= 2 and total > 4
    assert RunStore.open(fresh).chosen() == (RunStore.open(fresh).trial(race["winner"]), "race")

    # The same search in a process that kills itself (SIGKILL) at its 4th selection job.
    killed = tmp_path / "killed"
    script = textwrap.dedent(
        f"""
        import os, signal, sys
        from evomerge.run.executors import worker
        score, seen = worker.Worker.score, []
        def dying(self, recipe, job="dev"):
            if worker.Job.of(job).which == "select":
                seen.append(1)
                if len(seen) == 4:
                    os.kill(os.getpid(), signal.SIGKILL)
            return score(self, recipe, job)
        worker.Worker.score = dying
        from evomerge.app.cli import main
        sys.exit(main(["search", {str(config)!r}, "--run-dir", {str(killed)!r}, "--no-progress"]))
        """
    )
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, timeout=600)
    assert proc.returncode == -signal.SIGKILL, proc.stderr.decode()[-2000:]
    store = RunStore.open(killed)
    assert store.race() is None or store.race().get("winner") is None  # killed mid-race
    assert len(store.selections(race["fp"])) == 3  # three selection scores were stored

    asked.clear()
    assert main(["search", str(config), "--run-dir", str(killed), "--no-progress"]) == 0
    assert len(asked) == total - 3  # only what was missing was scored
    resumed = RunStore.open(killed).race()
    assert resumed["winner"] == race["winner"] and resumed["rounds"] == race["rounds"]


@pytest.mark.slow
def test_search_with_early_stopping_records_stopped_trials_and_never_exports_one(experiment, tmp_path):
    config = write_config(
        experiment,
        "early.yaml",
        early_stop={"enabled": True, "alpha": 0.45, "looks": [0.25, 0.5], "min_docs": 2},
        driver={"name": "random"},
        budget={"trials": 10},
    )
    run_dir = tmp_path / "run"
    assert main(["search", str(config), "--run-dir", str(run_dir), "--no-progress"]) == 0
    store = RunStore.open(run_dir)
    search = store.trials("search")
    stopped = [r for r in search if r.stopped]
    assert stopped, "a lenient alpha stops some random candidates"
    assert all(r.documents < N_DOCS and len(r.docs["sums/acc"]) == r.documents for r in stopped)
    assert all(r.documents == N_DOCS for r in search if not r.stopped and not r.cached)
    best = store.chosen()[0]
    assert not best.stopped and best.documents == N_DOCS


def test_select_and_early_stop_do_not_change_the_config_fingerprint(experiment):
    from evomerge.run.config import load_config

    plain = load_config(write_config(experiment, "fp_a.yaml"))[0]
    other = load_config(write_config(experiment, "fp_b.yaml", select={"top": 3}, early_stop={"enabled": True}))[0]
    assert plain.fingerprint() == other.fingerprint()


def test_bad_selection_and_early_stop_settings_are_refused(experiment, capsys):
    for overrides, fragment in [
        ({"select": {"top": 0}}, "top"),
        ({"early_stop": {"alpha": 1.5}}, "alpha"),
        ({"early_stop": {"looks": [0.5, 2]}}, "looks"),
    ]:
        config = write_config(experiment, "bad_select.yaml", **overrides)
        assert main(["search", str(config), "--run-dir", str(experiment / "never"), "--no-progress"]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and fragment in err, err


def test_evaluator_refuses_exclusion_that_leaves_nothing(experiment):
    with pytest.raises(EvomergeError, match="no documents left"):
        Evaluator(_spec(), experiment / "models" / "base", root=experiment, exclude={"sums": list(range(N_DOCS))})
