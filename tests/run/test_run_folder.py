"""A run folder: its own database wherever it goes, stale trials marked, and
refusals that write nothing (issue 17's run-folder cases)."""

import shutil

import optuna
import pytest
from helpers import write_config

from evomerge.app.cli import main
from evomerge.run.record import TrialRecord
from evomerge.run.store import STALE_REASON, RunStore

RECORD = {"config_fingerprint": "c0", "space_fingerprint": "s0", "config": {"storage": None}, "storage": "study.db"}


def _store(run_dir):
    return RunStore.create(run_dir, dict(RECORD), shared=False, directions=["maximize"], attrs={"objectives": ["a"]})


def _add(store, fitness):
    record = TrialRecord(kind="search", fitness=fitness, values={"a": fitness}, recipe={"method": "linear"})
    store.add(record, [fitness], {}, {})


def test_a_copied_or_moved_run_folder_uses_its_own_database(tmp_path):
    first = _store(tmp_path / "a")
    _add(first, 0.5)
    first.close()
    shutil.copytree(tmp_path / "a", tmp_path / "b")
    copy = _store(tmp_path / "b")  # a search resumed in the copy
    _add(copy, 0.7)
    copy.close()
    assert len(RunStore.open(tmp_path / "a").trials()) == 1  # the original is untouched
    assert len(RunStore.open(tmp_path / "b").trials()) == 2
    shutil.move(tmp_path / "a", tmp_path / "elsewhere")
    moved = RunStore.open(tmp_path / "elsewhere")  # what `status` opens
    assert [r.fitness for r in moved.trials()] == [0.5]


def test_a_run_recorded_with_an_absolute_database_path_still_uses_its_own(tmp_path):
    # Runs written before recorded sqlite:////abs/path/study.db in run.yaml.
    old = _store(tmp_path / "old")
    _add(old, 0.25)
    old.folder.write({**old.folder.read(), "storage": f"sqlite:///{tmp_path / 'gone' / 'study.db'}"})
    old.close()
    shutil.move(tmp_path / "old", tmp_path / "moved")
    assert [r.fitness for r in RunStore.open(tmp_path / "moved").trials()] == [0.25]


def test_trials_left_running_by_a_dead_driver_are_marked_stale_and_counted(tmp_path, capsys):
    from evomerge.app.export import status_table

    store = _store(tmp_path / "run")
    _add(store, 0.5)
    store.study.ask()  # a trial being scored when the driver was killed
    store.close()
    again = _store(tmp_path / "run")
    assert again.stale == 1
    (failed,) = again.study.get_trials(states=(optuna.trial.TrialState.FAIL,))
    assert failed.user_attrs == {"status": "stale", "reason": STALE_REASON}
    again.close()
    assert "1 stopped before finishing: interrupted or stale" in status_table(tmp_path / "run").splitlines()[0]
    assert _store(tmp_path / "run").stale == 0  # marked once


def _one_line(capsys, argv, *fragments):
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    for fragment in fragments:
        assert fragment in err, err


def test_a_refused_run_folder_gets_nothing_written(experiment, tmp_path, capsys):
    folder = tmp_path / "busy"
    folder.mkdir()
    (folder / "notes.txt").write_text("mine")
    _one_line(capsys, ["search", str(write_config(experiment)), "--run-dir", str(folder)], "not empty")
    assert [p.name for p in folder.iterdir()] == ["notes.txt"]  # no .lock either


def test_an_unwritable_run_folder_is_one_line(experiment, capsys):
    _one_line(capsys, ["search", str(write_config(experiment)), "--run-dir", "/proc/evomerge-run"], "--run-dir")


@pytest.fixture(scope="module")
def finished(experiment, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("finished") / "run"
    config = write_config(experiment, "finished.yaml", budget={"trials": 2})
    assert main(["search", str(config), "--run-dir", str(run_dir), "--no-progress"]) == 0
    return run_dir


@pytest.mark.slow
def test_report_and_export_to_paths_they_cannot_write_are_one_line(finished, tmp_path, capsys):
    folder = tmp_path / "a_folder"
    folder.mkdir()
    _one_line(capsys, ["report", str(finished), "--out", str(folder)], "is a folder")
    assert list(tmp_path.iterdir()) == [folder] and not list(folder.iterdir())  # no a_folder.tmp
    _one_line(capsys, ["report", str(finished), "--out", "/proc/evomerge/r.html"], "cannot write")
    _one_line(capsys, ["export", str(finished), "--out", "/proc/evomerge.yaml"], "cannot write")
    _one_line(capsys, ["export", str(finished), "--out", str(folder)], "is a folder")
