"""The ``evomerge demo`` command: build the demo problem, search it, and report.

The problem (a tiny base, two experts, lm-eval tasks) comes from
evomerge.demo_problem, its tiny models from evomerge.tiny. This module holds
the demo's search settings, writes its search config, runs the search and
compares the best recipe with the sources and the default merges on the
held-out split.
"""

from __future__ import annotations

from pathlib import Path

from evomerge.demo_problem import build_demo

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
            "objectives": [{"task": t, "metric": "acc"} for t in assets.dev_tasks],
        },
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


def run_demo(workdir: Path, progress: bool = True) -> int:
    """Build (once) a tiny base and two experts on different synthetic skills,
    search for the best merge, and compare it with the sources and the
    default merges on the held-out split."""
    from evomerge.export import export_best, status_table
    from evomerge.search import Run
    from evomerge.store import RunStore

    workdir = Path(workdir)
    config = demo_config(workdir)
    run_dir = workdir / "run"
    run = Run(config, run_dir, progress=progress, force=True)
    try:
        run.search()
    finally:
        run.close()
    print(status_table(run_dir, top=5))
    out, recipe = export_best(run_dir, out=workdir / "best_recipe.yaml")

    rows = []
    for r in RunStore.open(run_dir).trials():
        if r.heldout_fitness is not None and r.ok:
            what = r.name if r.kind == "baseline" else f"evolved (trial {r.number})"
            rows.append((what, r.kind, r.fitness, r.heldout_fitness, r.heldout_values))
    n = len(rows[0][4]) if rows else 1
    print(f"\nheld-out accuracy (mean over {n} skills; the search never saw these documents):")
    for what, _, dev, held, per in rows:
        skills = "  ".join(f"{k.split('/')[0]} {v:.3f}" for k, v in per.items())
        print(f"  {what:<28} held-out {held / n:.3f}   dev {dev / n:.3f}   {skills}")
    sources = [r for r in rows if r[0].startswith("source")]
    defaults = [r for r in rows if r[1] == "baseline" and not r[0].startswith("source")]
    evolved = [r for r in rows if r[1] == "search"]
    print(f"\nbest recipe: {out}")
    if not (sources and defaults and evolved):
        print("the best recipe is a baseline: the search did not beat it on the dev set")
        return 1
    best_source = max(sources, key=lambda r: r[3])
    best_default = max(defaults, key=lambda r: r[3])
    held = evolved[0][3]
    print(
        f"evolved {held / n:.3f} vs best source {best_source[3] / n:.3f} ({best_source[0]}) "
        f"and best default merge {best_default[3] / n:.3f} ({best_default[0]}) on held-out"
    )
    return 0 if held > best_source[3] and held > best_default[3] else 1
