"""A run folder: its own database wherever it goes, stale trials marked, and
refusals that write nothing (issue 17's run-folder cases)."""

import os
import random
import shutil
import sqlite3
from pathlib import Path

import optuna
import pytest
from helpers import write_config
from sqlalchemy.dialects import registry
from sqlalchemy.dialects.sqlite.pysqlite import SQLiteDialect_pysqlite
from sqlalchemy.engine import URL

from evomerge.app.cli import main
from evomerge.errors import EvomergeError
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
    return err


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


OLD_TPE = Path(__file__).parent / "data" / "old_runs" / "tpe"  # a stored three-trial run


def _stored_run(experiment, tmp_path):
    """A copy of the stored tpe run and its config, ready to resume."""
    config = experiment / "stored_tpe.yaml"
    shutil.copy(OLD_TPE / "config.yaml", config)
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    for part in ("run.yaml", "study.db"):
        shutil.copy(OLD_TPE / part, run_dir / part)
    return config, run_dir


def _truncate(path):
    with open(path, "r+b") as f:
        f.truncate(8192)  # as `truncate -s 8192 run/study.db`


def _random_bytes(path):
    path.write_bytes(random.Random(0).randbytes(path.stat().st_size))


@pytest.mark.parametrize("damage", [_truncate, _random_bytes], ids=["truncated", "random bytes"])
def test_a_corrupt_study_is_one_line_on_every_command_before_any_model_is_read(
    experiment, tmp_path, capsys, monkeypatch, damage
):
    from evomerge.run.run import Run

    config, run_dir = _stored_run(experiment, tmp_path)
    damage(run_dir / "study.db")
    damaged = (run_dir / "study.db").read_bytes()

    def no_model(*_args, **_kwargs):
        raise AssertionError("a model was read before the study was checked")

    with monkeypatch.context() as patch:
        patch.setattr(Run, "_build_space", no_model)
        patch.setattr(Run, "_build_workers", no_model)
        err = _one_line(capsys, ["search", str(config), "--run-dir", str(run_dir), "--no-progress"], "corrupt")
    assert "study.db" in err and "--force" in err and "restore it" in err
    for command in (["status", str(run_dir)], ["export", str(run_dir)], ["report", str(run_dir)]):
        err = _one_line(capsys, command, "corrupt or unreadable")
        assert "study.db" in err and "has no study yet" not in err
    assert (run_dir / "study.db").read_bytes() == damaged  # nothing touched
    assert sorted(p.name for p in run_dir.iterdir()) == ["run.yaml", "study.db"]

    # --force starts afresh there, keeping the damaged file aside.
    assert main(["search", str(config), "--run-dir", str(run_dir), "--no-progress", "--force"]) == 0
    aside = [p for p in run_dir.iterdir() if p.name.startswith("study.db.corrupt-")]
    assert len(aside) == 1 and aside[0].read_bytes() == damaged
    assert len(RunStore.open(run_dir).trials("search")) == 3  # the config's budget, from scratch


SECRET = "S3cret-pw-4711"


class PasswordSqlite(SQLiteDialect_pysqlite):
    """SQLite behind a URL with a user and password (``sqlite+pwtest://user:pw@//path``):
    a database that wants its password, without a server. As PostgreSQL's
    driver does, it takes the password from ``PGPASSWORD`` when the URL has none."""

    supports_statement_cache = True

    def create_connect_args(self, url):
        self.password_given = url.password or os.environ.get("PGPASSWORD")
        return super().create_connect_args(URL.create(url.drivername, database=url.database, query=url.query))

    def connect(self, *args, **kwargs):
        if self.password_given != SECRET:
            raise sqlite3.OperationalError("password authentication failed for user evomerge")
        return super().connect(*args, **kwargs)


registry.register("sqlite.pwtest", __name__, "PasswordSqlite")


def test_masked_hides_a_password_and_connect_url_fills_it_from_the_environment(monkeypatch):
    from evomerge.run._run_folder import connect_url, masked

    url = f"postgresql+psycopg://user:{SECRET}@db-host:5432/evomerge"
    assert masked(url) == "postgresql+psycopg://user:***@db-host:5432/evomerge"
    assert masked("postgresql://user@db-host/evomerge") == "postgresql://user@db-host/evomerge"
    with_var = "postgresql+psycopg://user:${EVOMERGE_DB_PASSWORD}@db-host/evomerge"
    assert masked(with_var) == with_var  # the name of the variable is no secret
    monkeypatch.setenv("EVOMERGE_DB_PASSWORD", "p@ss:w/rd")
    assert connect_url(with_var) == "postgresql+psycopg://user:p%40ss%3Aw%2Frd@db-host/evomerge"
    # A URL read back from run.yaml: the database driver finds the password itself (PGPASSWORD, a passfile).
    assert connect_url(masked(url)) == "postgresql+psycopg://user@db-host:5432/evomerge"
    monkeypatch.delenv("EVOMERGE_DB_PASSWORD")
    with pytest.raises(EvomergeError, match=r"EVOMERGE_DB_PASSWORD.*not set"):
        connect_url(with_var)


@pytest.mark.slow
def test_a_password_in_the_storage_url_is_written_nowhere(experiment, tmp_path, capsys, monkeypatch):
    storage = f"sqlite+pwtest://evomerge:{SECRET}@/{tmp_path / 'shared.db'}"
    config = write_config(experiment, "secret.yaml", budget={"trials": 2}, storage=storage)
    run_dir = tmp_path / "run"
    assert main(["search", str(config), "--run-dir", str(run_dir), "--no-progress"]) == 0
    config = write_config(experiment, "secret.yaml", budget={"trials": 3}, storage=storage)
    assert main(["search", str(config), "--run-dir", str(run_dir), "--no-progress"]) == 0  # resumes
    capsys.readouterr()
    # run.yaml holds the URL masked: a reader needs the password from elsewhere, and says so.
    err = _one_line(capsys, ["status", str(run_dir)], "cannot open the storage", "***", "PGPASSWORD")
    assert SECRET not in err
    monkeypatch.setenv("PGPASSWORD", SECRET)
    assert main(["status", str(run_dir)]) == 0
    out = tmp_path / "out"
    assert main(["export", str(run_dir), "--out", str(out / "best.yaml"), "--merge", str(out / "model")]) == 0
    assert main(["report", str(run_dir), "--out", str(out / "report.html")]) == 0
    printed = capsys.readouterr()
    assert len(RunStore.open(run_dir).trials("search")) == 3
    assert "***" in (run_dir / "run.yaml").read_text()  # the URL is there, masked
    files = [p for folder in (run_dir, out) for p in folder.rglob("*") if p.is_file()]
    assert len(files) >= 5
    leaks = [p.name for p in files if SECRET.encode() in p.read_bytes()]
    assert not leaks, leaks
    assert SECRET not in printed.out and SECRET not in printed.err


def test_an_unset_variable_in_the_storage_url_is_one_line_and_writes_nothing(experiment, tmp_path, capsys):
    storage = "sqlite+pwtest://evomerge:${EVOMERGE_UNSET_PASSWORD}@/" + str(tmp_path / "shared.db")
    config = write_config(experiment, "unset.yaml", storage=storage)
    run_dir = tmp_path / "run"
    _one_line(capsys, ["search", str(config), "--run-dir", str(run_dir), "--no-progress"], "EVOMERGE_UNSET_PASSWORD")
    assert not run_dir.exists() and not (tmp_path / "shared.db").exists()


@pytest.mark.parametrize(
    "content", [b"config: [unclosed", b"\x89\xff\x00 not text", b"- a list\n"], ids=["yaml", "bytes", "list"]
)
def test_a_damaged_run_file_is_one_line_on_every_command_and_force_keeps_it_aside(
    experiment, tmp_path, capsys, monkeypatch, content
):
    from evomerge.run.run import Run

    config, run_dir = _stored_run(experiment, tmp_path)
    (run_dir / "run.yaml").write_bytes(content)
    with monkeypatch.context() as patch:
        patch.setattr(Run, "_build_workers", lambda *_: pytest.fail("a model was read before the run file was checked"))
        err = _one_line(capsys, ["search", str(config), "--run-dir", str(run_dir), "--no-progress"], "run.yaml")
    assert "corrupt or unreadable" in err and "--force" in err
    for command in (["status", str(run_dir)], ["export", str(run_dir)], ["report", str(run_dir)]):
        _one_line(capsys, command, "run.yaml", "corrupt or unreadable")
    assert (run_dir / "run.yaml").read_bytes() == content
    assert main(["search", str(config), "--run-dir", str(run_dir), "--no-progress", "--force"]) == 0
    kept = sorted(p.name.split(".corrupt-")[0] for p in run_dir.iterdir() if ".corrupt-" in p.name)
    assert kept == ["run.yaml", "study.db"]
    assert len(RunStore.open(run_dir).trials("search")) == 3


@pytest.mark.parametrize(
    "storage, fragment",
    [("notaurl", "not a database URL"), (f"mysql+nosuchdriver://u:{SECRET}@h/d", "not installed")],
    ids=["not a URL", "no driver"],
)
def test_a_storage_that_cannot_be_opened_is_one_line_with_its_password_masked(
    experiment, tmp_path, capsys, storage, fragment
):
    config = write_config(experiment, "bad_storage.yaml", storage=storage)
    run_dir = tmp_path / "run"
    err = _one_line(capsys, ["search", str(config), "--run-dir", str(run_dir), "--no-progress"], fragment)
    assert SECRET not in err and not run_dir.exists()


def test_a_study_whose_writer_was_killed_mid_transaction_is_not_called_corrupt(tmp_path):
    import subprocess
    import sys

    from evomerge.run._run_folder import study_file_problem

    db = tmp_path / "study.db"
    writer = (
        "import os, sqlite3, sys\n"
        "db = sqlite3.connect(sys.argv[1], isolation_level=None)\n"
        "db.execute('PRAGMA cache_size=1')\n"
        "db.execute('CREATE TABLE t (x BLOB)')\n"
        "db.execute('INSERT INTO t VALUES (zeroblob(1000))')\n"
        "db.execute('BEGIN')\n"
        "for _ in range(2000): db.execute('INSERT INTO t VALUES (zeroblob(1000))')\n"
        "os.kill(os.getpid(), 9)\n"
    )
    subprocess.run([sys.executable, "-c", writer, str(db)])
    assert (tmp_path / "study.db-journal").is_file()  # a hot journal: the killed transaction's
    assert study_file_problem(db) is None
    import sqlite3

    assert sqlite3.connect(db).execute("SELECT count(*) FROM t").fetchone() == (1,)  # rolled back
