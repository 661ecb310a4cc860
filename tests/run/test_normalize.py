"""Keeping every skill in a search: objectives normalized by the best
source (``normalize: expert``), the fitness as the min or softmin of them
(``fitness:``), with early stopping and the selection race under the same
rule, a resume that keeps the references, and the shares kept shown by
status and the export. The rules themselves: tests/fitness/test_aggregate.py."""

import pytest
import yaml
from conftest import N_DOCS
from helpers import search_refused, write_config

from evomerge.app.cli import main
from evomerge.app.export import export_best
from evomerge.fitness.aggregate import Aggregate
from evomerge.fitness.baselines import is_source
from evomerge.fitness.evaluate import Evaluator
from evomerge.fitness.paired import fitness, prefix
from evomerge.fitness.score import Versus
from evomerge.fitness.spec import EvalSpec
from evomerge.run.store import RunStore

DEV = [
    {"task": "sums", "metric": "acc", "normalize": "expert"},
    {"task": "sums_heldout", "metric": "acc", "normalize": "expert"},
]
NAMES = ["sums/acc", "sums_heldout/acc"]


def _config(experiment, name, trials=6, rule="min", **overrides):
    eval_ = {"include_path": "tasks", "objectives": DEV, "batch_size": 32}
    held = [{"task": "sums_heldout", "metric": "acc", "normalize": "expert"}]
    settings = {
        "eval": eval_,
        "heldout": {"include_path": "tasks", "objectives": held},
        "fitness": {"aggregate": rule},
        "driver": {"name": "random"},
        "budget": {"trials": trials},
    }
    return write_config(experiment, name, **{**settings, **overrides})


def _best_source(records, name, key="values"):
    return max(getattr(r, key)[name] for r in records if is_source(r.name))


@pytest.mark.slow
def test_a_min_search_over_shares_of_the_experts_and_a_resume_that_keeps_the_references(experiment, tmp_path, capsys):
    config = _config(experiment, "keep_every_skill.yaml")
    run_dir = tmp_path / "run"
    assert main(["search", str(config), "--run-dir", str(run_dir), "--no-progress"]) == 0
    store = RunStore.open(run_dir)
    baselines = store.trials("baseline")
    refs = store.references()
    # each reference is the best source's own score, on dev and on held-out
    assert refs["eval"] == {n: _best_source(baselines, n) for n in NAMES}
    assert refs["heldout"] == {"sums_heldout/acc": _best_source(baselines, "sums_heldout/acc", "heldout_values")}
    # every fitness is the worst share kept, baselines and search alike
    ok = [r for r in store.trials() if r.ok]
    assert len(ok) > len(baselines)
    for r in ok:
        assert r.fitness == pytest.approx(min(r.values[n] / refs["eval"][n] for n in NAMES))
        if r.heldout_values is not None:
            want = r.heldout_values["sums_heldout/acc"] / refs["heldout"]["sums_heldout/acc"]
            assert r.heldout_fitness == pytest.approx(want)
    assert max(r.fitness for r in baselines if is_source(r.name)) <= 1.0

    # status shows the share each trial keeps of each skill
    capsys.readouterr()
    assert main(["status", str(run_dir)]) == 0
    out = capsys.readouterr().out
    source = next(r for r in baselines if is_source(r.name))
    row = next(line for line in out.splitlines() if f" {source.name} " in f" {line} ")
    share = source.values[NAMES[0]] / refs["eval"][NAMES[0]]
    assert f"{source.values[NAMES[0]]:.4f} ({100 * share:.0f}%)" in row
    assert "share of the reference kept" in out
    # and so does the export
    _, recipe = export_best(run_dir, out=tmp_path / "best.yaml", progress=False)
    meta = recipe.metadata["evomerge"]
    assert meta["dev"]["kept"] == pytest.approx({n: meta["dev"]["objectives"][n] / refs["eval"][n] for n in NAMES})

    # a resume with a larger budget keeps the references and scores no source again
    data = yaml.safe_load(config.read_text())
    data["budget"]["trials"] = 9
    config.write_text(yaml.safe_dump(data))
    assert main(["search", str(config), "--run-dir", str(run_dir), "--no-progress"]) == 0
    again = RunStore.open(run_dir)
    assert again.references() == refs
    assert [r.number for r in again.trials("baseline")] == [r.number for r in baselines]
    assert len(again.trials("search")) == 9
    for r in again.trials():
        if r.ok:
            assert r.fitness == pytest.approx(min(r.values[n] / refs["eval"][n] for n in NAMES))


@pytest.mark.slow
def test_the_selection_race_ranks_by_the_runs_rule(experiment, tmp_path):
    config = _config(experiment, "keep_race.yaml", select={"top": 3, "min_docs": 2}, heldout=None)
    data = yaml.safe_load(config.read_text())
    data["eval"]["samples"] = N_DOCS // 2  # the other half for the race
    config.write_text(yaml.safe_dump(data))
    run_dir = tmp_path / "run"
    assert main(["search", str(config), "--run-dir", str(run_dir), "--no-progress"]) == 0
    store = RunStore.open(run_dir)
    race, rule = store.race(), store.aggregate("select")
    assert rule.rule == "min" and rule.references == store.references()["eval"]
    assert race["winner"] is not None
    last = race["rounds"][-1]
    for number, score in last["scores"].items():
        docs = store.selections(race["fp"])[int(number)]["docs"]
        assert score == pytest.approx(fitness(prefix(docs, {n: N_DOCS - N_DOCS // 2 for n in NAMES}), rule))
    # the winner has the best worst-kept skill of the last round
    assert race["winner"] == int(max(last["scores"], key=last["scores"].get))


def test_early_stopping_compares_on_the_runs_rule(experiment):
    """A candidate better than the incumbent by the sum of its shares but
    worse on its worst-kept skill is stopped under min and not under sum."""
    import transformers

    spec = EvalSpec(include_path="tasks", objectives=DEV, batch_size=32)
    ev = Evaluator(spec, experiment / "models" / "base", root=experiment)
    model = transformers.AutoModelForCausalLM.from_pretrained(experiment / "models" / "expert_a")
    full = ev.score(model)
    a, b = NAMES
    c_a, c_b = full.values[a], full.values[b]
    assert c_a > 0 and 0 < c_b < 0.5, full.values  # the tiny expert's scores the setting needs
    refs = {a: c_a / 2, b: 1.0}  # the candidate keeps 200% of a and c_b of b
    incumbent = {a: [c_a / 2] * N_DOCS, b: [0.9] * N_DOCS}  # it keeps 100% of a and 90% of b
    weights = {a: 1.0, b: 1.0}
    by_sum, by_min = Aggregate(weights, refs), Aggregate(weights, refs, "min")
    assert by_sum.value(full.values) > by_sum.value({a: c_a / 2, b: 0.9})
    assert by_min.value(full.values) < by_min.value({a: c_a / 2, b: 0.9})
    looks = {"docs": incumbent, "looks": (0.5,), "min_docs": 2, "alpha": 0.25}
    assert not ev.score(model, versus=Versus(**looks, aggregate=by_sum)).stopped
    stopped = ev.score(model, versus=Versus(**looks, aggregate=by_min))
    assert stopped.stopped and stopped.documents == N_DOCS  # half of each task's


@pytest.mark.parametrize(
    "overrides, fragment",
    [
        ({"baselines": False}, "baselines are off"),
        ({"fitness": {"aggregate": "max"}}, "fitness"),
        ({"fitness": {"aggregate": "softmin", "temperature": 0}}, "temperature"),
        (
            {"eval": {"include_path": "tasks", "objectives": [{"task": "sums", "metric": "acc", "normalize": -2}]}},
            "normalize",
        ),
        (
            {
                "eval": {"include_path": "tasks", "objectives": [{"task": "sums", "metric": "acc"}], "samples": 8},
                "select": {"objectives": [{"task": "sums_heldout", "metric": "acc", "normalize": "expert"}]},
            },
            "is not a dev objective",
        ),
    ],
)
def test_bad_fitness_settings_are_refused_in_one_line(experiment, capsys, overrides, fragment):
    config = _config(
        experiment, "bad_rule.yaml", **{k: v for k, v in overrides.items() if k in ("baselines", "select")}
    )
    data = yaml.safe_load(config.read_text())
    data.update({k: v for k, v in overrides.items() if k not in ("baselines", "select")})
    config.write_text(yaml.safe_dump(data))
    search_refused(capsys, config, experiment / "never", fragment)


def test_the_fitness_rule_is_part_of_the_fingerprint_and_the_default_is_not(experiment):
    from evomerge.run.config import load_config

    plain = load_config(write_config(experiment, "fp_sum.yaml"))[0]
    explicit = load_config(write_config(experiment, "fp_sum2.yaml", fitness={"aggregate": "sum"}))[0]
    by_min = load_config(write_config(experiment, "fp_min.yaml", fitness={"aggregate": "min"}))[0]
    objectives = [{"task": "sums", "metric": "acc", "normalize": "expert"}]
    normalized = load_config(
        write_config(
            experiment, "fp_norm.yaml", eval={"include_path": "tasks", "objectives": objectives, "batch_size": 32}
        )
    )[0]
    assert plain.fingerprint() == explicit.fingerprint()
    assert len({plain.fingerprint(), by_min.fingerprint(), normalized.fingerprint()}) == 3
