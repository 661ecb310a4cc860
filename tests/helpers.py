"""Small helpers shared by the tests."""

import random
from pathlib import Path

import torch
import yaml
from safetensors.torch import load_file


def read_tensors(folder: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a model folder, across all its shards."""
    files = sorted(Path(folder).glob("*.safetensors"))
    assert files, f"no weights in {folder}"
    out: dict[str, torch.Tensor] = {}
    for f in files:
        out.update(load_file(f))
    return out


def write_sum_tasks(tasks: Path, n_docs: int) -> None:
    """Two local multiple-choice tasks of sums (a dev one and a held-out one)."""
    from evomerge.fitness.evaluate import write_choice_task

    rng = random.Random(0)
    for name in ("sums", "sums_heldout"):
        docs = []
        for _ in range(n_docs):
            a, b = rng.randint(0, 9), rng.randint(0, 9)
            choices = [f" {a + b}", f" {a + b + 1}", f" {a * b + 3}", f" {abs(a - b)}"]
            rng.shuffle(choices)
            docs.append({"q": f"{a}+{b}=", "choices": choices, "label": choices.index(f" {a + b}")})
        write_choice_task(tasks, name, docs)


def write_config(root: Path, name: str = "config.yaml", **overrides) -> Path:
    """A search config over the ``experiment`` fixture's models and tasks."""
    config = {
        "base_model": "models/base",
        "models": ["models/expert_a", "models/expert_b"],
        "space": "task_arithmetic_layerwise",
        "eval": {"include_path": "tasks", "objectives": [{"task": "sums", "metric": "acc"}], "batch_size": 32},
        "heldout": {"include_path": "tasks", "objectives": [{"task": "sums_heldout", "metric": "acc"}]},
        "budget": {"trials": 6},
        "driver": {"name": "cma", "popsize": 4},
        "seed": 0,
    }
    config.update(overrides)
    path = root / name
    path.write_text(yaml.safe_dump(config))
    return path


def trials(run_dir: Path, kind: str | None = None) -> list:
    """The complete trials of a run folder (of one kind: baseline, search)."""
    import optuna

    from evomerge.run.store import RunStore

    study = RunStore.open(run_dir).study
    return [
        t
        for t in study.get_trials(states=(optuna.trial.TrialState.COMPLETE,))
        if kind is None or t.user_attrs.get("kind") == kind
    ]


def driver_settings(name: str, **wanted) -> dict:
    """A driver section with those of ``wanted`` that the driver reads."""
    from evomerge.run.drivers import DRIVERS

    reads = DRIVERS[name][1].declared()
    return {"name": name, **{k: v for k, v in wanted.items() if k in reads}}


SLOW_OBJECTIVE = """
import time


def score(model, tokenizer):
    time.sleep(0.4)  # slow enough for the test to kill the search mid-run
    return {"norm": float(sum(p.float().norm() for p in model.parameters()))}
"""


def slow_eval(experiment) -> dict:
    """The sums task plus an objective that sleeps, for tests that act mid-search."""
    (experiment / "slow_objective.py").write_text(SLOW_OBJECTIVE)
    objectives = [
        {"task": "sums", "metric": "acc"},
        {"custom": "slow_objective:score", "metric": "norm", "weight": 0.001},
    ]
    return {"include_path": "tasks", "objectives": objectives, "batch_size": 32}


def check_two_drivers(config: Path, tmp_path: Path, trials: int) -> None:
    """Two drivers (processes) on the config's shared storage: the baselines
    run once, the budget counts both drivers' trials, none is left running,
    and they proposed different candidates."""
    import subprocess
    import sys

    import optuna

    from evomerge.run.store import RunStore

    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "evomerge", "search", str(config), "--run-dir", str(tmp_path / f"driver{i}")],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        for i in range(2)
    ]
    for p in procs:
        _, err = p.communicate(timeout=300)
        assert p.returncode == 0, err.decode()[-2000:]
    study = RunStore.open(tmp_path / "driver0").study
    complete = study.get_trials(states=(optuna.trial.TrialState.COMPLETE,))
    assert sum(t.user_attrs["kind"] == "baseline" for t in complete) == 7  # run once, by one driver
    search = [t for t in complete if t.user_attrs["kind"] == "search"]
    assert trials <= len(search) <= trials + 1  # both drivers' trials count (two may start the last at once)
    assert not study.get_trials(states=(optuna.trial.TrialState.RUNNING,))
    # the drivers proposed different points (their seeds are salted)
    assert len({t.user_attrs["fingerprint"] for t in search}) == len(search)


# Marks the worker process busy while it scores, so the test kills a worker
# mid-candidate, not between two.
BUSY_OBJECTIVE = """
import os
import time
from pathlib import Path

BUSY = Path(__file__).parent / "busy"


def score(model, tokenizer):
    BUSY.mkdir(exist_ok=True)
    mark = BUSY / str(os.getpid())
    mark.touch()
    try:
        time.sleep(SECONDS)
    finally:
        mark.unlink(missing_ok=True)
    return {"norm": float(sum(p.float().norm() for p in model.parameters()))}
"""


def ray_config(experiment, name, busy_s: float = 0.3, **overrides):
    """A config for the Ray executor's tests: the sums task and an objective
    that marks its worker busy for ``busy_s`` seconds per candidate."""
    (experiment / "busy_objective.py").write_text(BUSY_OBJECTIVE.replace("SECONDS", repr(busy_s)))
    objectives = [
        {"task": "sums", "metric": "acc"},
        {"custom": "busy_objective:score", "metric": "norm", "weight": 0.001},
    ]
    settings = {
        "eval": {"include_path": "tasks", "objectives": objectives, "batch_size": 32},
        "executor": {"name": "ray", "workers": 2, "num_cpus": 1, "retries": 2},
        **overrides,
    }
    return write_config(experiment, name, **settings)


def start_search(config: Path, run_dir: Path, stdout=None):
    """``evomerge search`` in a process of its own (output discarded unless ``stdout``)."""
    import subprocess
    import sys

    cmd = [sys.executable, "-m", "evomerge", "search", str(config), "--run-dir", str(run_dir), "--no-progress"]
    return subprocess.Popen(cmd, stdout=stdout or subprocess.DEVNULL, stderr=subprocess.PIPE)


def wait_for_trials(run_dir: Path, proc, count: int, timeout: float = 240, files=("run.yaml", "study.db")) -> None:
    """Wait until the running search ``proc`` has recorded ``count`` search
    trials in ``run_dir`` (whose ``files`` exist once its study does); a
    search that ends first fails the test with its error."""
    import time

    import pytest

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        time.sleep(0.3)
        assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
        if all((run_dir / f).exists() for f in files):
            try:
                if len(trials(run_dir, "search")) >= count:
                    return
            except Exception:  # noqa: BLE001 - the study is being created
                continue
    pytest.fail(f"the search did not record {count} search trials in {timeout:.0f} s")


def kill_search_after(config: Path, run_dir: Path, count: int, pause: float = 0.0, **wait) -> None:
    """Start a search, and kill it with SIGKILL ``pause`` seconds after it
    recorded ``count`` search trials."""
    import os
    import signal
    import time

    proc = start_search(config, run_dir)
    try:
        wait_for_trials(run_dir, proc, count, **wait)
        time.sleep(pause)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    finally:
        if proc.poll() is None:
            proc.kill()


def completed(run_dir: Path) -> dict:
    """Each complete trial's number -> its recipe fingerprint and values: what a resume must keep."""
    return {t.number: (t.user_attrs["fingerprint"], t.values) for t in trials(run_dir)}


def search_refused(capsys, config: Path, run_dir: Path, fragment: str) -> None:
    """``evomerge search`` refuses the config in one line naming ``fragment``, exit 2, and makes no run folder."""
    from evomerge.app.cli import main

    assert main(["search", str(config), "--run-dir", str(run_dir), "--no-progress"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and fragment in err, err
    assert not run_dir.exists()
