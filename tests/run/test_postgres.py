"""Searches on a real PostgreSQL server (tests/pg_server.py): a search runs
and is read while it runs, is killed with -9 at random points and resumed
with no completed trial lost, two drivers share one study, and the
database password is never printed nor written into a file."""

import random
import subprocess

import optuna
import pytest
from helpers import (
    check_two_drivers,
    completed,
    kill_search_after,
    slow_eval,
    start_search,
    trials,
    wait_for_trials,
    write_config,
)
from pg_server import PASSWORD

from evomerge.app.cli import main
from evomerge.run.store import RunStore

pytestmark = pytest.mark.slow


@pytest.fixture
def database(postgres, monkeypatch):
    """A fresh database's URL, with the password given through the
    environment, as the README advises (so that every reader of the run
    folder finds it)."""
    monkeypatch.setenv("EVOMERGE_TEST_PG_PASSWORD", PASSWORD)
    return lambda name: postgres.url(name, password="${EVOMERGE_TEST_PG_PASSWORD}")


def _config(experiment, name, url, **overrides):
    settings = {"budget": {"trials": 6}, "driver": {"name": "tpe", "startup_trials": 3}, "storage": url}
    return write_config(experiment, name, **{**settings, **overrides})


def _no_password_in(*paths):
    for path in paths:
        for f in [path] if path.is_file() else path.rglob("*"):
            if f.is_file() and f.suffix in (".yaml", ".html", ".json", ".txt", ".log", ""):
                assert PASSWORD not in f.read_text(errors="replace"), f


def test_a_search_on_postgresql_is_read_while_it_runs_and_never_shows_its_password(
    database, experiment, tmp_path, capsys
):
    url = database("read_while_running")
    config = _config(experiment, "pg_read.yaml", url, eval=slow_eval(experiment))
    run_dir = tmp_path / "run"
    proc = start_search(config, run_dir, stdout=subprocess.PIPE)
    try:
        wait_for_trials(run_dir, proc, 2, files=("run.yaml",))
        assert main(["status", str(run_dir)]) == 0  # read while the search writes
        assert "search (task_arithmetic)" in capsys.readouterr().out
        assert main(["report", str(run_dir), "--out", str(tmp_path / "mid.html")]) == 0
        out, err = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, err.decode()[-2000:]
    assert PASSWORD not in out.decode() + err.decode()
    assert len(trials(run_dir, "search")) == 6 and len(trials(run_dir, "baseline")) == 7
    assert main(["status", str(run_dir)]) == 0
    assert main(["export", str(run_dir), "--out", str(tmp_path / "best.yaml")]) == 0
    assert main(["report", str(run_dir), "--out", str(tmp_path / "report.html")]) == 0
    assert PASSWORD not in "".join(capsys.readouterr())
    _no_password_in(run_dir, tmp_path / "best.yaml", tmp_path / "report.html", tmp_path / "mid.html")


def test_a_password_written_in_the_url_is_masked_and_taken_from_pgpassword_after(
    postgres, experiment, tmp_path, monkeypatch, capsys
):
    url = postgres.url("password_in_url")
    config = _config(experiment, "pg_inline.yaml", url, budget={"trials": 2})
    run_dir = tmp_path / "run"
    assert main(["search", str(config), "--run-dir", str(run_dir), "--no-progress"]) == 0
    assert "***" in (run_dir / "run.yaml").read_text()
    _no_password_in(run_dir)
    # status reads run.yaml's masked URL back: the driver takes the password from PGPASSWORD
    monkeypatch.setenv("PGPASSWORD", PASSWORD)
    assert main(["status", str(run_dir)]) == 0
    assert PASSWORD not in "".join(capsys.readouterr())


@pytest.mark.parametrize("seed", [0, 1])
def test_kill_9_at_a_random_point_then_resume_loses_no_completed_trial(database, experiment, tmp_path, seed):
    url = database(f"kill_{seed}")
    config = _config(experiment, f"pg_kill_{seed}.yaml", url, budget={"trials": 10}, eval=slow_eval(experiment))
    run_dir = tmp_path / "run"
    at = random.Random(seed).randint(1, 6)  # search trials recorded when the driver is killed
    pause = random.Random(seed).uniform(0, 0.5)  # anywhere in the next candidate
    kill_search_after(config, run_dir, at, pause=pause, files=("run.yaml",))
    before = completed(run_dir)
    assert at <= len(trials(run_dir, "search")) < 10

    assert main(["search", str(config), "--run-dir", str(run_dir), "--no-progress"]) == 0
    after = completed(run_dir)
    assert all(after[n] == v for n, v in before.items())  # nothing completed was lost
    assert len(trials(run_dir, "search")) == 10 and len(trials(run_dir, "baseline")) == 7
    study = RunStore.open(run_dir).study
    assert not study.get_trials(states=(optuna.trial.TrialState.RUNNING,))


def test_two_drivers_share_one_study_on_postgresql(database, experiment, tmp_path):
    url = database("two_drivers")
    config = _config(experiment, "pg_shared.yaml", url, budget={"trials": 8}, eval=slow_eval(experiment))
    check_two_drivers(config, tmp_path, trials=8)
