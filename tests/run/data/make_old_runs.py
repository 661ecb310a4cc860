"""Make the stored runs of ``tests/run/data/old_runs`` (run once, by hand).

They stand for run folders made before the driver settings were split into
one model per driver (commit 9752c0e). Run this with that commit's package
first on the path::

    git worktree add /tmp/old 9752c0e
    PYTHONPATH=/tmp/old:/tmp/old/tests python tests/run/data/make_old_runs.py

It builds the ``experiment`` fixture's folder (the same seeds), runs a short
search per driver, and keeps each run's config, ``run.yaml`` and
``study.db``, with the fingerprints that code gave every driver section.
"""

import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml
from conftest import N_DOCS
from helpers import write_config, write_sum_tasks

from evomerge.app.demo.tiny import make_finetune, make_tiny_model
from evomerge.run.config import SearchConfig

OUT = Path(__file__).parent / "old_runs"
RUNS = {"tpe": {"name": "tpe", "startup_trials": 2}, "nsga2": {"name": "nsga2", "popsize": 2}}
SECTIONS = [
    {},
    {"name": "cma"},
    {"name": "cma", "sigma0": 0.3, "popsize": 4, "restarts": 2},
    {"name": "tpe"},
    {"name": "tpe", "startup_trials": 3},
    {"name": "gp", "startup_trials": 0},
    {"name": "cmaes", "popsize": 5},
    {"name": "random"},
    {"name": "nsga2"},
    {"name": "nsga2", "popsize": 16},
]


def experiment(root: Path) -> None:
    base = make_tiny_model(root / "models" / "base", arch="llama", layers=2, hidden=32, seed=0)
    for i, name in enumerate(["expert_a", "expert_b"]):
        make_finetune(base, root / "models" / name, seed=i + 1, scale=0.5)
    write_sum_tasks(root / "tasks", N_DOCS)


def main() -> None:
    OUT.mkdir(exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        experiment(root)
        for name, driver in RUNS.items():
            config = write_config(root, f"{name}.yaml", driver=driver, budget={"trials": 3})
            run_dir = root / f"run_{name}"
            cmd = [sys.executable, "-m", "evomerge", "search", str(config), "--run-dir", str(run_dir), "--no-progress"]
            subprocess.run(cmd, check=True)
            keep = OUT / name
            keep.mkdir(exist_ok=True)
            shutil.copy(config, keep / "config.yaml")
            for part in ("run.yaml", "study.db"):
                shutil.copy(run_dir / part, keep / part)
        base = yaml.safe_load(write_config(root).read_text())
    prints = []
    for section in SECTIONS:
        data = {**base, "driver": section} if section else {k: v for k, v in base.items() if k != "driver"}
        prints.append({"driver": section, "fingerprint": SearchConfig.model_validate(data).fingerprint()})
    stored = {"config": base, "fingerprints": prints}
    (OUT / "fingerprints.json").write_text(json.dumps(stored, indent=1) + "\n")


if __name__ == "__main__":
    main()
