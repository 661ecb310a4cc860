"""The run store: the trial record's stored form, and runs written before it existed."""

import shutil
import sqlite3
from pathlib import Path

import pytest
import yaml

from evomerge.engine.folder import atomic_write
from evomerge.errors import EvomergeError
from evomerge.run.record import TrialRecord
from evomerge.run.store import RunStore

STUDIES = Path(__file__).resolve().parents[2] / "experiments" / "smollm2_skills" / "results" / "studies"


def test_a_record_round_trips_through_its_stored_form():
    record = TrialRecord(
        kind="baseline",
        name="ties (density 0.5)",
        fitness=0.5,
        values={"a/acc": 0.25, "b/acc": 0.25},
        metrics={"a/acc": 0.25},
        recipe={"method": "ties"},
        fingerprint="f" * 64,
        seconds=2.0,
        merge_seconds=0.5,
        eval_seconds=1.25,
        attempts=2,
        heldout_values={"a/acc": 0.2},
        heldout_fitness=0.2,
        heldout_metrics={"a/acc": 0.2},
        extra={"cma_generation": "0:1", "cma_index": 3},
    )
    attrs = record.to_attrs()
    assert attrs["heldout"] == {"a/acc": 0.2} and attrs["cma_index"] == 3 and "reason" not in attrs
    back = TrialRecord.from_attrs(attrs, number=4, told=[0.5], params={"x": 1.0})
    assert back == TrialRecord(**{**record.__dict__, "number": 4, "told": [0.5], "params": {"x": 1.0}})


def test_a_failure_keeps_its_reason_and_an_explicit_non_finite_flag():
    failed = TrialRecord(kind="search", status="failed", reason="non-finite weights", non_finite=True)
    attrs = failed.to_attrs()
    assert attrs["non_finite"] is True and "fitness" not in attrs
    back = TrialRecord.from_attrs(attrs)
    assert back.non_finite and not back.ok and back.reason == "non-finite weights"
    # An out-of-memory failure is not a property of the recipe: never flagged.
    oom = TrialRecord.from_attrs(TrialRecord(kind="search", status="failed", reason="out of memory").to_attrs())
    assert not oom.non_finite


def test_records_written_before_the_flag_existed_read_it_from_the_reason():
    old = {"kind": "search", "status": "failed", "reason": "non-finite metric x/acc", "values": {}, "metrics": {}}
    assert TrialRecord.from_attrs(old).non_finite
    assert not TrialRecord.from_attrs({**old, "reason": "RuntimeError: boom"}).non_finite


def test_atomic_write_replaces_the_file_and_leaves_no_temporary(tmp_path):
    path = tmp_path / "run.yaml"
    atomic_write(path, "a: 1\n")
    atomic_write(path, b"a: 2\n")
    assert path.read_text() == "a: 2\n"
    assert [p.name for p in tmp_path.iterdir()] == ["run.yaml"]


@pytest.mark.parametrize("name", sorted(p.name for p in STUDIES.iterdir()) if STUDIES.is_dir() else [])
def test_a_run_written_by_earlier_code_opens_and_reads_like_its_raw_study(name, tmp_path):
    # The SmolLM2 experiment's archived studies were written before the store:
    # reading them through it must give what the raw database holds.
    run = tmp_path / name
    run.mkdir()
    shutil.copy2(STUDIES / name / "study.db", run / "study.db")
    record = yaml.safe_load((STUDIES / name / "run.yaml").read_text())
    record["storage"] = f"sqlite:///{run / 'study.db'}"
    (run / "run.yaml").write_text(yaml.safe_dump(record))
    store = RunStore.open(run)
    db = sqlite3.connect(run / "study.db")
    complete = db.execute("select count(*) from trials where state = 'COMPLETE'").fetchone()[0]
    assert len(store.trials()) == complete > 0
    kinds = dict(
        db.execute(
            "select value_json, count(*) from trial_user_attributes where key = 'kind' group by value_json"
        ).fetchall()
    )
    assert len(store.trials("search")) == kinds['"search"'] and len(store.trials("baseline")) == kinds['"baseline"']
    best = db.execute(
        "select t.number, a.value_json from trials t join trial_user_attributes a on a.trial_id = t.trial_id "
        "where a.key = 'fitness' order by cast(a.value_json as real) desc, t.number limit 1"
    ).fetchone()
    assert (store.best().number, store.best().fitness) == (best[0], float(best[1]))
    held = db.execute("select count(*) from study_user_attributes where key like 'heldout_%'").fetchone()[0]
    assert sum(r.heldout_values is not None for r in store.trials("search")) == held
    assert all(r.ok for r in store.trials("baseline")) and store.objectives


def test_a_folder_without_a_run_is_refused_with_the_fix(tmp_path):
    with pytest.raises(EvomergeError, match="holds no evomerge run"):
        RunStore.open(tmp_path)


def test_a_restarted_folder_fails_the_trials_its_dead_search_left_on_a_shared_storage(tmp_path):
    """On a shared storage a running trial is another driver's until its
    heartbeat expires; one this folder's earlier search asked for (it holds
    the folder's id) is failed at once when the folder's search starts again."""
    import optuna

    url = f"sqlite:///{tmp_path / 'shared.db'}"
    record = {"config_fingerprint": "c0", "space_fingerprint": "s0", "config": {"storage": url}, "storage": url}

    def open_store(folder):
        return RunStore.create(tmp_path / folder, dict(record), shared=True, directions=["maximize"], attrs={}, url=url)

    mine, theirs = open_store("mine"), open_store("theirs")
    left = mine.study.ask()
    mine.started(left)
    alive = theirs.study.ask()
    theirs.started(alive)
    mine.close()  # the search dies with its trial running
    again = open_store("mine")
    states = {t.number: t.state for t in again.study.get_trials()}
    assert again.stale == 1 and states[left.number] == optuna.trial.TrialState.FAIL
    assert states[alive.number] == optuna.trial.TrialState.RUNNING  # the other driver's: alive
    assert again.study.trials[left.number].user_attrs["status"] == "stale"
    theirs.close()
    again.close()
