"""The ``evomerge demo`` command: build the demo problem, search it, and report.

The problem (a tiny base, two experts, lm-eval tasks) comes from
evomerge.app.demo.problem, its tiny models from evomerge.app.demo.tiny. This module holds
the demo's search settings, writes its search config, runs the search and
compares the best recipe with the sources and the default merges on the
held-out split.
"""

from __future__ import annotations

import os
from pathlib import Path

from evomerge.app.demo import problem as demo_problem
from evomerge.app.demo.problem import build_demo
from evomerge.errors import EvomergeError

# The demo's search: what the README's first command runs.
DEMO_SPACE = "ties_layerwise"
DEMO_DRIVER = {"name": "cma", "popsize": 8, "sigma0": 0.2}
DEMO_TRIALS = 200


def demo_config(workdir: Path) -> Path:
    """Write the demo's search config (models and tasks from ``build_demo``)."""
    import yaml

    workdir = Path(workdir).resolve()
    assets = build_demo(workdir)
    rel = lambda p: str(Path(p).relative_to(workdir))  # noqa: E731
    config = {
        "base_model": rel(assets.base),
        "models": [rel(p) for p in assets.experts],
        "space": DEMO_SPACE,
        "dtype": "float32",
        "seed": 0,
        "eval": {
            "include_path": rel(assets.tasks_dir),
            "batch_size": 64,
            # Half of each dev task's documents; the other half are the selection race's.
            "samples": demo_problem.DEV_DOCS // 2,
            "objectives": [{"task": t, "metric": "acc"} for t in assets.dev_tasks],
        },
        "select": {"top": 8},
        "heldout": {
            "include_path": rel(assets.tasks_dir),
            "batch_size": 64,
            "objectives": [{"task": t, "metric": "acc"} for t in assets.heldout_tasks],
        },
        "budget": {"trials": DEMO_TRIALS},
        "driver": DEMO_DRIVER,
    }
    path = workdir / "search.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def _check_workdir(workdir: Path) -> None:
    """Refuse a ``--workdir`` the demo cannot build in, in one line."""
    if workdir.exists() and not workdir.is_dir():
        raise EvomergeError(f"demo folder {workdir} is a file; pass a folder as --workdir")
    try:
        workdir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise EvomergeError(
            f"cannot create the demo folder {workdir} ({e.strerror or e}); pass a writable --workdir"
        ) from None
    if not os.access(workdir, os.W_OK | os.X_OK):
        raise EvomergeError(f"demo folder {workdir} is not writable; pass a writable --workdir")


def run_demo(workdir: Path, progress: bool = True) -> int:
    """Build (once) a tiny base and two experts on different synthetic skills,
    search for the best merge, and compare it with the sources and the
    default merges on the held-out split."""
    from evomerge.app.export import export_best, status_table
    from evomerge.fitness.baselines import is_source
    from evomerge.run.run import Run
    from evomerge.run.store import RunStore

    workdir = Path(workdir)
    _check_workdir(workdir)
    config = demo_config(workdir)
    run_dir = workdir / "run"
    run = Run(config, run_dir, progress=progress, force=True)
    try:
        run.search()
    finally:
        run.close()
    print(status_table(run_dir, top=5))
    out, recipe = export_best(run_dir, out=workdir / "best_recipe.yaml")

    store = RunStore.open(run_dir)
    winner, rule = store.chosen()
    if winner is None:
        print("no candidate was scored successfully; see the status table above")
        return 1
    rows = []
    for record in store.trials():
        if record.heldout_fitness is not None and record.complete:
            what = record.name if record.kind == "baseline" else f"evolved (trial {record.number})"
            if record is winner or record.number == winner.number:
                what += " *"
            rows.append((what, record, record.heldout_values))
    n = len(rows[0][2]) if rows else 1
    print(f"\nheld-out accuracy (mean over {n} skills; the search never saw these documents):")
    for what, r, per in rows:
        skills = "  ".join(f"{k.split('/')[0]} {v:.3f}" for k, v in per.items())
        print(f"  {what:<30} held-out {r.heldout_fitness / n:.3f}   dev {r.fitness / n:.3f}   {skills}")
    chose = "the selection race" if rule == "race" else "the best dev score"
    print(f"* the exported best, chosen by {chose}: {out}")
    sources = [r for _, r, _ in rows if r.kind == "baseline" and is_source(r.name)]
    defaults = [r for _, r, _ in rows if r.kind == "baseline" and not is_source(r.name)]
    if winner.kind != "search" or not (sources and defaults):
        print(f"the exported best is a baseline ({winner.name}): no evolved recipe beat it")
        return 1
    best_source = max(sources, key=lambda r: r.heldout_fitness)
    best_default = max(defaults, key=lambda r: r.heldout_fitness)
    held = winner.heldout_fitness
    print(
        f"evolved {held / n:.3f} vs best source {best_source.heldout_fitness / n:.3f} ({best_source.name}) "
        f"and best default merge {best_default.heldout_fitness / n:.3f} ({best_default.name}) on held-out"
    )
    return 0 if held > best_source.heldout_fitness and held > best_default.heldout_fitness else 1
