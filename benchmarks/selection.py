"""Selection and early stopping against plain search, at the same documents.

Two small merge problems, each a tiny base and two experts on different
skills, with dev documents (300 per skill) and held-out documents (400 per
skill) that no arm sees until its winner is chosen:

- ``demo``: the demo's problem (multiple choice, loglikelihood accuracy);
- ``gen``: benchmarks/gen_problem.py (greedy generation, exact match).

Arms, each given the same number of scored documents in total (``--docs``,
search trials plus the selection race; baselines are the same for all):

- ``plain``: today's behaviour without a ``select`` section: the search
  optimises on all 300 dev documents per skill and exports the best dev score;
- ``plain_half``: the same on the 150 documents the select arms search on
  (the other 150 unused): how much of a difference is the race's, and how
  much the search's documents';
- ``select``: the search optimises on 150 of them and the best candidates and
  the baselines race on the other 150 (``select``); the race winner is exported;
- ``select_es``: as ``select``, with early stopping (``early_stop``, defaults).

The split of dev documents between search and selection, and the driver's
seed, change with the seed. For each run the script records the exported
recipe's dev, selection and held-out fitness (as mean accuracy over the
skills), whether it beats the best default merge (by dev) on held-out data,
the documents scored per candidate, and candidates per hour. Results go to
``--out`` (one JSON line per run, so a stopped benchmark keeps what it has)
and a summary table (mean and standard error over seeds) to stdout::

    .venv/bin/python benchmarks/selection.py [--problems demo,gen] [--seeds 0,1,2,3,4]
        [--arms plain,plain_half,select,select_es] [--docs 30000] [--threads 1] [--workdir /tmp/evomerge_selection]
        [--out benchmarks/selection.jsonl]

Each problem can run in its own process (``--problems demo`` and ``--problems
gen`` with two ``--out`` files) at one thread each.

Problems, splits, arms and budgets were fixed before any held-out number was
seen; do not tune them to the method.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

DEV_DOCS = 300  # per skill, in both problems
SEARCH_DOCS = 150  # of them, what the select arms search on
TOP = 8  # search candidates in the race
ARMS = ("plain", "plain_half", "select", "select_es", "plain_es", "fidelity")


def build(problem: str, workdir: Path):
    if problem == "demo":
        from evomerge.app.demo.problem import build_demo

        return build_demo(workdir / "demo", progress=False)
    from gen_problem import build_gen_problem

    return build_gen_problem(workdir / "gen", progress=False)


def config(problem: str, assets, arm: str, seed: int, docs: int, root: Path) -> dict:
    from evomerge.app.demo.run import DEMO_DRIVER, DEMO_SPACE
    from evomerge.fitness.race import cost

    metric = "acc" if problem == "demo" else "exact_match"
    rel = lambda p: os.path.relpath(p, root)  # noqa: E731
    objectives = lambda tasks: [{"task": t, "metric": metric} for t in tasks]  # noqa: E731
    ev = {"include_path": rel(assets.tasks_dir), "batch_size": 64, "seed": seed}
    cfg = {
        "base_model": rel(assets.base),
        "models": [rel(p) for p in assets.experts],
        "space": DEMO_SPACE,
        "dtype": "float32",
        "seed": seed,
        "eval": {**ev, "objectives": objectives(assets.dev_tasks)},
        "heldout": {**ev, "objectives": objectives(assets.heldout_tasks)},
        "driver": DEMO_DRIVER,
        "budget": {"documents": docs},
    }
    if arm not in ("plain", "plain_es", "fidelity"):
        cfg["eval"]["samples"] = SEARCH_DOCS
    if arm in ("select", "select_es"):
        cfg["select"] = {"top": TOP}
        baselines = 7  # the sources (3) and default merges (4) of a base and two experts
        sizes = {t: DEV_DOCS - SEARCH_DOCS for t in assets.dev_tasks}
        cfg["budget"]["documents"] = docs - cost(baselines + TOP, sizes)
    if arm in ("select_es", "plain_es"):
        cfg["early_stop"] = {"enabled": True}
    if arm == "fidelity":
        cfg["fidelity"] = {"enabled": True}
    return cfg


def measure(run_dir: Path, n_skills: int) -> dict:
    from evomerge.fitness.race import selection_estimate
    from evomerge.run.record import judged as judged_of
    from evomerge.run.store import RunStore

    store = RunStore.open(run_dir)
    records = store.trials()
    winner, rule = store.chosen()
    race = store.race() or {}
    search = [r for r in records if r.kind == "search" and r.status == "ok"]
    scored = [r for r in search if not r.cached]
    sel = selection_estimate(store.selections(race.get("fp", "")).get(winner.number), store.aggregate("select"))
    judged = judged_of(records, store.race(), store.aggregate("heldout"))
    default = store.trial(judged.default) if judged is not None else None
    search_docs = sum(r.documents or 0 for r in scored)
    return {
        "winner": winner.number,
        "winner_kind": winner.kind,
        "winner_name": winner.name,
        "rule": rule,
        "dev": winner.fitness / n_skills,
        "selection": sel.value / n_skills if sel is not None else None,
        "heldout": winner.heldout_fitness / n_skills,
        "gap": (winner.fitness - winner.heldout_fitness) / n_skills,
        "default_heldout": default.heldout_fitness / n_skills if default is not None else None,
        "beats_default": bool(default is not None and winner.heldout_fitness > default.heldout_fitness),
        "verdict_p": judged.p if judged is not None else None,
        "search_trials": len(search),
        "stopped": sum(r.stopped for r in scored),
        "search_docs": search_docs,
        "race_docs": int(race.get("documents", 0)),
        "docs_per_candidate": search_docs / max(1, len(scored)),
        "candidates_per_hour": len(search) / max(store.elapsed, 1e-9) * 3600,
        "search_seconds": store.elapsed,
    }


def run_one(problem: str, assets, arm: str, seed: int, docs: int, workdir: Path) -> dict:
    import yaml

    from evomerge.run.run import Run

    root = workdir / "runs"
    root.mkdir(parents=True, exist_ok=True)
    name = f"{problem}_{arm}_{seed}"
    path = root / f"{name}.yaml"
    path.write_text(yaml.safe_dump(config(problem, assets, arm, seed, docs, root), sort_keys=False))
    t0 = time.perf_counter()
    run = Run(path, root / name, progress=False, force=True, allow_outside_paths=True)
    try:
        run.search()
    finally:
        run.close()
    out = {"problem": problem, "arm": arm, "seed": seed, "docs_budget": docs}
    out.update(measure(root / name, len(assets.dev_tasks)))
    out["wall_seconds"] = time.perf_counter() - t0
    return out


def _mean_se(xs: list[float]) -> str:
    xs = [x for x in xs if x is not None]
    if not xs:
        return "-"
    se = statistics.stdev(xs) / math.sqrt(len(xs)) if len(xs) > 1 else 0.0
    return f"{statistics.fmean(xs):.3f} ± {se:.3f}"


def summary(rows: list[dict]) -> str:
    head = (
        "| problem | arm | seeds | held-out | dev | dev - held-out | selection - held-out | beats best default "
        "| docs / candidate | candidates / hour | total docs |"
    )
    lines = [head, "|" + "---|" * 11]
    for problem in dict.fromkeys(r["problem"] for r in rows):
        for arm in ARMS:
            rs = [r for r in rows if r["problem"] == problem and r["arm"] == arm]
            if not rs:
                continue
            sel_gap = [r["selection"] - r["heldout"] for r in rs if r["selection"] is not None]
            total = statistics.fmean(r["search_docs"] + r["race_docs"] for r in rs)
            lines.append(
                f"| {problem} | {arm} | {len(rs)} | {_mean_se([r['heldout'] for r in rs])} "
                f"| {_mean_se([r['dev'] for r in rs])} | {_mean_se([r['gap'] for r in rs])} "
                f"| {_mean_se(sel_gap)} | {sum(r['beats_default'] for r in rs)}/{len(rs)} "
                f"| {statistics.fmean(r['docs_per_candidate'] for r in rs):.0f} "
                f"| {statistics.fmean(r['candidates_per_hour'] for r in rs):.0f} | {total:.0f} |"
            )
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--problems", default="demo,gen")
    ap.add_argument("--seeds", default="0,1,2,3,4")
    ap.add_argument("--arms", default=",".join(ARMS))
    ap.add_argument("--docs", type=int, default=30000, help="documents scored per run (search and race)")
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/evomerge_selection"))
    ap.add_argument("--out", type=Path, default=Path("benchmarks/selection.jsonl"))
    ap.add_argument("--threads", type=int, default=1, help="torch threads")
    ap.add_argument("--summary-only", action="store_true", help="print the table of --out and stop")
    args = ap.parse_args()
    # One torch thread per run: runs are comparable, and two benchmark
    # processes (one per problem) share a 2-core machine without slowing
    # each other's threads down.
    import torch

    torch.set_num_threads(args.threads)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    rows = [json.loads(line) for line in args.out.read_text().splitlines()] if args.out.is_file() else []
    if not args.summary_only:
        done = {(r["problem"], r["arm"], r["seed"]) for r in rows}
        for problem in args.problems.split(","):
            assets = build(problem, args.workdir)
            for seed in map(int, args.seeds.split(",")):
                for arm in args.arms.split(","):
                    if (problem, arm, seed) in done:
                        continue
                    row = run_one(problem, assets, arm, seed, args.docs, args.workdir)
                    rows.append(row)
                    with args.out.open("a") as f:
                        f.write(json.dumps(row) + "\n")
                    print(json.dumps(row), flush=True)
    print(summary(rows))


if __name__ == "__main__":
    main()
