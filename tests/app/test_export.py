"""What status, export and report show of the selection race, early stopping
and the held-out verdict ("trust the winner"), on run stores built by hand."""

import re

import yaml

from evomerge.app.cli import main
from evomerge.app.export import export_best, status_table
from evomerge.app.report import write_report
from evomerge.fitness.paired import paired
from evomerge.fitness.race import selection_estimate
from evomerge.run.record import TrialRecord
from evomerge.run.store import RunStore

DEV, HELD = "t/acc", "t_heldout/acc"
CONFIG = {
    "models": ["models/expert_a", "models/expert_b"],
    "base_model": "models/base",
    "space": "task_arithmetic_layerwise",
    "eval": {"include_path": "tasks", "objectives": [{"task": "t", "metric": "acc"}]},
    "heldout": {"include_path": "tasks", "objectives": [{"task": "t_heldout", "metric": "acc"}]},
    "select": {"top": 2},
    "early_stop": {"enabled": True},
}


def ones(k: int, n: int = 40) -> list[int]:
    """Per-document accuracies: the first ``k`` of ``n`` documents right."""
    return [1] * k + [0] * (n - k)


def recipe(a: float, b: float) -> dict:
    return {
        "method": "linear",
        "sources": [
            {"model": "models/expert_a", "parameters": {"weight": a}},
            {"model": "models/expert_b", "parameters": {"weight": b}},
        ],
    }


SOURCE = {"method": "passthrough", "sources": [{"model": "models/expert_a"}]}
# trial number -> (kind, name, recipe, dev documents right of 40 (or of 16, stopped), held-out of 40, stopped)
TRIALS = {
    0: ("baseline", "source expert_a", SOURCE, 20, 20, False),
    1: ("baseline", "linear (equal weights)", recipe(1.0, 1.0), 24, 22, False),
    2: ("search", None, recipe(0.3, 0.7), 32, 28, False),  # the best dev fitness
    3: ("search", None, recipe(0.6, 0.4), 30, 30, False),  # the race's winner
    4: ("search", None, recipe(0.9, 0.1), 4, None, True),  # stopped early on 16 documents
}
# the race: trial -> selection documents right of those it was scored on
SELECTION = {0: (4, 16), 1: (8, 16), 2: (19, 32), 3: (26, 32)}


def make_run(root, experiment, *, race: bool = True, docs: bool = True):
    """A finished run: two baselines (a source and a default merge), three
    search trials (one stopped early), held-out scores, and (``race``) a
    selection race won by trial 3 although trial 2 has the best dev fitness."""
    run_dir = root / ("raced" if race else "plain") / ("docs" if docs else "nodocs")
    record = {
        "config_fingerprint": "c0",
        "space_fingerprint": "s0",
        "config": CONFIG,
        "config_path": str(experiment / "search.yaml"),
        "storage": "study.db",
    }
    store = RunStore.create(run_dir, record, shared=False, directions=["maximize"], attrs={"objectives": [DEV]})
    for number, (kind, name, rec, right, held, stopped) in TRIALS.items():
        n = 16 if stopped else 40
        dev = ones(right, n)
        trial = TrialRecord(
            kind=kind,
            name=name,
            recipe=rec,
            fingerprint=f"{number:064d}",
            fitness=right / n,
            values={DEV: right / n},
            docs={DEV: dev} if docs else None,
            documents=n,
            stopped=stopped,
        )
        store.add(trial, [right / n], {}, {})
        if held is not None:
            store.set_heldout(
                number,
                heldout_values={HELD: held / 40},
                heldout_fitness=held / 40,
                heldout_docs={HELD: ones(held)} if docs else None,
            )
    if race:
        for number, (right, n) in SELECTION.items():
            store.set_selection(number, {"fp": "fp1", "docs": {DEV: ones(right, n)}})
        store.set_race(
            {
                "fp": "fp1",
                "winner": 3,
                "entrants": [0, 1, 2, 3],
                "rounds": [
                    {"documents": 64, "scores": {"0": 0.25, "1": 0.5, "2": 0.5625, "3": 0.75}, "kept": [3, 2]},
                    {"documents": 64, "scores": {"2": 19 / 32, "3": 26 / 32}, "kept": [3, 2]},
                ],
                "documents": 128,
            }
        )
    store.close()
    return run_dir


def row_of(text: str, number: int) -> str:
    """The status table's row of a trial (its mark, then its number)."""
    return next(line for line in text.splitlines() if line[3:].split()[:1] == [str(number)])


def cells(row: str) -> list[str]:
    """A status row's cells: the mark (where there is one), trial, what, dev,
    the objective, selection, held-out."""
    return re.split(r"\s{2,}", row.strip())


def verdict_diff(winner: int) -> str:
    test = paired({HELD: ones(TRIALS[winner][4])}, {HELD: ones(TRIALS[1][4])}, {HELD: 1.0})
    return f"{test.diff:+.4f} (paired SE {test.se:.4f}"


def test_status_names_the_race_winner_marks_stopped_trials_and_gives_the_verdict(experiment, tmp_path, capsys):
    run_dir = make_run(tmp_path, experiment)
    assert main(["status", str(run_dir)]) == 0
    text = capsys.readouterr().out
    lines = text.splitlines()
    assert "3 search trials (0 failed, 1 stopped early)" in lines[0]
    assert "exported best: trial 3, chosen by the selection race (4 entrants)" in lines[1]
    assert all(len(line) <= 120 for line in lines), text
    header = lines[2].split()
    assert header[:3] == ["trial", "what", "dev"] and header[-2:] == ["selection", "held-out"]
    # the winner is marked and shows its selection score with its interval; the best dev trial is not marked
    winner = row_of(text, 3)
    assert winner.startswith("*")
    entry = {"docs": {DEV: ones(*SELECTION[3])}}
    assert str(selection_estimate(entry, {DEV: 1.0})) in winner and "±" in winner
    assert not row_of(text, 2).startswith("*")
    # the stopped trial is listed after the complete ones, marked, with no selection or held-out score
    stopped = row_of(text, 4)
    assert stopped.startswith("~") and cells(stopped)[-2:] == ["-", "-"]
    assert lines.index(stopped) > lines.index(row_of(text, 2))
    assert "~ stopped early" in text
    # the paired held-out verdict against the best default merge
    # (folded to 120 columns)
    verdict = " ".join(text[text.index("verdict: ") :].split())
    assert verdict.startswith(
        f"verdict: held-out against the best default merge linear (equal weights) (trial 1): {verdict_diff(3)}"
    )
    assert verdict_diff(3).startswith("+0.2000")


def test_status_always_shows_the_exported_best(experiment, tmp_path):
    run_dir = make_run(tmp_path, experiment)
    text = status_table(run_dir, top=1)  # trial 2 ranks first by dev fitness; 3 is still shown
    assert row_of(text, 2) and row_of(text, 3).startswith("*")
    assert not any(line.startswith("~") for line in text.splitlines())


def test_export_writes_the_race_winner_with_its_rule_and_verdict(experiment, tmp_path):
    run_dir = make_run(tmp_path, experiment)
    out, recipe = export_best(run_dir, out=tmp_path / "best.yaml", progress=False)
    meta = yaml.safe_load(out.read_text())["metadata"]["evomerge"]
    assert meta["trial"] == 3 and meta["chosen_by"] == "race"
    assert [s.parameters["weight"] for s in recipe.sources] == [0.6, 0.4]
    assert meta["dev"]["fitness"] == 0.75 and meta["dev"]["se"] > 0 and meta["dev"]["documents"] == 40
    assert meta["selection"]["fitness"] == 26 / 32 and meta["selection"]["se"] > 0
    assert meta["heldout"]["fitness"] == 0.75 and meta["heldout"]["se"] > 0
    assert meta["verdict"]["winner"] == 3 and meta["verdict"]["rule"] == "race"
    assert meta["verdict"]["default"] == 1 and abs(meta["verdict"]["diff"] - 0.2) < 1e-12
    assert meta["verdict"]["se"] > 0 and 0 < meta["verdict"]["p"] < 1

    def lists(value):  # no per-document scores in the metadata
        if isinstance(value, dict):
            return any(lists(v) for v in value.values())
        return isinstance(value, list)

    assert not lists(meta)


def test_export_of_a_given_trial_says_so(experiment, tmp_path):
    run_dir = make_run(tmp_path, experiment)
    _, recipe = export_best(run_dir, out=tmp_path / "t2.yaml", trial=2, progress=False)
    meta = recipe.metadata["evomerge"]
    assert meta["trial"] == 2 and meta["chosen_by"] == "trial"
    assert meta["verdict"]["winner"] == 2 and abs(meta["verdict"]["diff"] - 0.15) < 1e-12


def test_a_run_without_a_race_exports_the_best_dev_trial(experiment, tmp_path, capsys):
    run_dir = make_run(tmp_path, experiment, race=False)
    assert main(["export", str(run_dir), "--out", str(tmp_path / "best.yaml")]) == 0
    assert "(trial 2, chosen by best dev fitness," in capsys.readouterr().out
    meta = yaml.safe_load((tmp_path / "best.yaml").read_text())["metadata"]["evomerge"]
    assert meta["trial"] == 2 and meta["chosen_by"] == "dev" and "selection" not in meta
    assert meta["verdict"]["winner"] == 2 and meta["verdict"]["rule"] == "dev"
    text = status_table(run_dir)
    assert "exported best: trial 2, chosen by best dev fitness;" in text
    assert row_of(text, 2).startswith("*") and cells(row_of(text, 3))[-2] == "-"  # no selection score


def test_a_run_without_per_document_scores_shows_plain_values(experiment, tmp_path):
    run_dir = make_run(tmp_path, experiment, race=False, docs=False)
    text = status_table(run_dir)
    assert "±" not in text and cells(row_of(text, 2)) == [
        "*",
        "2",
        "search (linear)",
        "0.8000",
        "40",  # the dev documents it was scored on
        "0.8000",
        "-",
        "0.7000",
    ]
    verdict = " ".join(text[text.index("verdict: ") :].split())
    assert verdict.startswith(
        "verdict: held-out against the best default merge linear (equal weights) (trial 1): +0.1500"
    )
    _, recipe = export_best(run_dir, out=tmp_path / "best.yaml", progress=False)
    meta = recipe.metadata["evomerge"]
    assert "se" not in meta["dev"] and "se" not in meta["heldout"] and meta["verdict"]["se"] is None


def test_the_report_names_the_rule_and_the_verdict(experiment, tmp_path):
    run_dir = make_run(tmp_path, experiment)
    text = write_report(run_dir).read_text()
    assert "exported best: trial 3, chosen by the selection race (4 entrants)" in text
    assert "best search trial by dev fitness: trial 2" in text
    assert f"held-out against the best default merge linear (equal weights) (trial 1): {verdict_diff(3)}" in text
    assert "<th>selection</th>" in text and "stopped early" in text
    # the exported best beside the best default merge, with intervals
    section = text[text.index('id="chosen"') : text.index("id='progress'")]
    assert "exported best" in section and "best default merge" in section and section.count("±") >= 6


def test_a_race_not_yet_finished_leaves_the_best_dev_trial_chosen(experiment, tmp_path):
    run_dir = make_run(tmp_path, experiment, race=False)
    store = RunStore.open(run_dir)
    store.set_selection(3, {"fp": "fp1", "docs": {DEV: ones(12, 16)}})
    store.set_race({"fp": "fp1", "documents": 16})  # killed mid-race: no winner yet
    text = status_table(run_dir)
    assert "exported best: trial 2, chosen by best dev fitness (the selection race has not finished" in text
    assert cells(row_of(text, 3))[-2].startswith("0.7500 ±")  # its selection score so far
