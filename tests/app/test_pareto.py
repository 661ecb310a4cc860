"""Choosing a point of the Pareto front to export (``export --pick``): the
front, the shares kept, the max-min and weighted rules, on records and on
an NSGA-II run with its report."""

import pytest
import yaml
from helpers import write_config

from evomerge.app.cli import main
from evomerge.app.pareto import front_of, pick, share_references, shares
from evomerge.errors import EvomergeError
from evomerge.fitness.aggregate import Aggregate
from evomerge.run.record import TrialRecord
from evomerge.run.store import RunStore

A, B = "a/acc", "b/acc"
W = Aggregate({A: 1.0, B: 1.0})


def _r(number, a, b, kind="search", name=None, stopped=False):
    return TrialRecord(kind=kind, name=name, number=number, fitness=a + b, values={A: a, B: b}, stopped=stopped)


RECORDS = [
    _r(0, 0.9, 0.2, "baseline", "source expert_a"),
    _r(1, 0.3, 0.8, "baseline", "source expert_b"),
    _r(2, 0.85, 0.5),  # the best sum: 1.35
    _r(3, 0.7, 0.64),  # the most balanced: 0.78 and 0.80 of the experts
    _r(4, 0.6, 0.6),  # dominated by 3
    _r(5, 0.95, 0.95, stopped=True),  # an estimate: never on the front
]


def test_the_front_holds_the_complete_undominated_trials():
    assert [r.number for r in front_of(RECORDS, W)] == [0, 1, 2, 3]
    # a minimised objective is signed: lower is better
    down = Aggregate({A: 1.0, B: -1.0})
    assert [r.number for r in front_of(RECORDS, down)] == [0]  # the best a and the lowest b


def test_max_min_keeps_every_skill_and_weighted_the_sum():
    refs = share_references(RECORDS, W)
    assert refs == {A: 0.9, B: 0.8}  # each skill's best source
    assert shares(RECORDS[3], refs, W) == pytest.approx({A: 0.7 / 0.9, B: 0.8})
    assert pick(RECORDS, "max-min", W).number == 3
    assert pick(RECORDS, "weighted", W).number == 2
    # a normalized objective's reference is its own, not the best source's
    normalized = Aggregate({A: 1.0, B: 1.0}, {B: 0.5})
    assert share_references(RECORDS, normalized) == {A: 0.9, B: 0.5}
    # ties go to the lower trial number
    assert pick([*RECORDS, _r(7, 0.7, 0.64)], "max-min", W).number == 3


def test_pick_rules_refuse_what_they_cannot_do():
    with pytest.raises(EvomergeError, match="unknown pick rule"):
        pick(RECORDS, "median", W)
    search_only = [r for r in RECORDS if r.kind == "search"]
    with pytest.raises(EvomergeError, match="needs a reference for objective a/acc"):
        pick(search_only, "max-min", W)
    assert pick(search_only, "weighted", W).number == 2
    with pytest.raises(EvomergeError, match="no trial scored on every dev document"):
        pick([RECORDS[5]], "weighted", W)


@pytest.mark.slow
def test_an_nsga2_run_exports_the_picked_point_and_the_report_labels_the_front(experiment, tmp_path, capsys):
    objectives = [{"task": "sums", "metric": "acc"}, {"task": "sums_heldout", "metric": "acc"}]
    config = write_config(
        experiment,
        "pick_nsga.yaml",
        driver={"name": "nsga2", "popsize": 4},
        budget={"trials": 8},
        heldout=None,
        eval={"include_path": "tasks", "objectives": objectives, "batch_size": 32},
    )
    run_dir = tmp_path / "run"
    assert main(["search", str(config), "--run-dir", str(run_dir), "--no-progress"]) == 0
    records = RunStore.open(run_dir).trials()
    rule = Aggregate({"sums/acc": 1.0, "sums_heldout/acc": 1.0})
    refs = share_references(records, rule)
    front = front_of(records, rule)
    balanced = max(front, key=lambda r: (min(shares(r, refs, rule).values()), -r.number))
    for how, want in (("max-min", balanced), ("weighted", max(front, key=lambda r: (r.fitness, -r.number)))):
        out = tmp_path / f"{how}.yaml"
        assert main(["export", str(run_dir), "--pick", how, "--out", str(out)]) == 0
        meta = yaml.safe_load(out.read_text())["metadata"]["evomerge"]
        assert meta["trial"] == want.number and meta["chosen_by"] == f"pick {how}"
        assert set(meta["pick"]["front"]) == {str(r.number) for r in front}
    capsys.readouterr()
    assert main(["export", str(run_dir), "--pick", "max-min", "--trial", "3"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "both --trial and --pick" in err

    report = tmp_path / "report.html"
    assert main(["report", str(run_dir), "--out", str(report)]) == 0
    html = report.read_text()
    assert "the share it keeps of each objective" in html and "--pick max-min" in html
