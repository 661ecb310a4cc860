"""Evolve merges of SmolLM2-135M experts and write the held-out results table.

One command runs everything, and running it again resumes where it stopped
(the experts are cached, finished searches report at once, an interrupted
search continues from its study, finished table rows are cached):

    .venv/bin/python experiments/smollm2_skills/run.py

Steps: build the base, the experts and the tasks (``problem.py``); run the
searches one after another with ``evomerge search``; export each search's
best recipe; merge every reported model to disk with ``evomerge merge``'s
code path and score it on the held-out splits with lm-eval (one record per
document, for the paired test); write ``results/table.md`` and
``results/results.json``. ``--only NAME`` runs one search; ``--table-only``
skips the searches; ``--compare`` also times one candidate done as
``mergekit-yaml`` plus the ``lm_eval`` CLI.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
WORK = HERE / "work"
RUNS = HERE / "runs"
RESULTS = HERE / "results"
# Committed copies of every finished search's study (and of the per-document
# held-out scores), so that a fresh checkout remakes the table and the reports
# without rerunning hours of search: RUNS and WORK are not committed.
ARCHIVE = RESULTS / "studies"
HELDOUT_SCORES = RESULTS / "heldout_per_doc.json"
sys.path.insert(0, str(HERE.parent))

import common  # noqa: E402
from common import ENV, evomerge_cli, mean_se, splice_table  # noqa: E402

problem = common.load_module(HERE / "problem.py")

TARGET = "fr_math"
# Parameter space: the paper's layer-wise DARE-TIES (a weight and a density
# per model per block), with blocks of 5 layers (6 blocks of SmolLM2's 30) so
# that 24 dimensions suit a budget of 80 candidates.
PS_SPACE = {
    "methods": ["dare_ties"],
    "search": {"weight": {"per": "block", "block": 5}, "density": {"per": "block", "block": 5}},
    "fixed": {"lambda": 1.0},
}
# Data-flow space: the constrained path (position k runs layer k of the model
# it picks), a scale per position.
DFS_SPACE = {"routing": {"path": {}, "scale": "per_slot", "scale_bounds": [0.7, 1.3]}}
TRIALS = 80
# Score this many of each search's best trials (by dev) on the held-out set:
# how far the dev ranking carries over to unseen documents.
HELDOUT_TOP = 5
SEARCHES = {  # name -> (space, driver, uses the fixed merge of ps_cma)
    "ps_cma": (PS_SPACE, {"name": "cma", "popsize": 10, "sigma0": 0.2, "restarts": 0}, False),
    "dfs_cma": (DFS_SPACE, {"name": "cma", "popsize": 10, "sigma0": 0.2, "restarts": 0}, False),
    "ps_dfs_cma": (DFS_SPACE, {"name": "cma", "popsize": 10, "sigma0": 0.2, "restarts": 0}, True),
    "ps_tpe": (PS_SPACE, {"name": "tpe", "startup_trials": 10}, False),
    "ps_cma_brier": (PS_SPACE, {"name": "cma", "popsize": 10, "sigma0": 0.2, "restarts": 0}, False),
}
# The dev metric each search maximises (default: accuracy). ps_cma_brier
# tests whether a continuous fitness, which moves with the probability of the
# right answer even at chance accuracy, carries over to held-out data better.
DEV_METRIC = {"ps_cma_brier": {"metric": "brier_score", "direction": "minimize"}}
HELDOUT_TASKS = [problem.task_name(t, "test") for t in (TARGET, "math", "french")]
DEV_ACC = f"{problem.task_name(TARGET, 'dev')}/acc"  # the column every search is compared on


def write_config(name: str) -> Path:
    """The search config of one search, in WORK (its paths are relative to it)."""
    import yaml

    space, driver, hybrid = SEARCHES[name]
    config = {
        "base_model": "models/base",
        "models": ["models/expert_math", "models/expert_french"],
        "space": space,
        "dtype": "float32",
        "seed": 0,
        "eval": {
            "include_path": "tasks",
            "batch_size": 64,
            "objectives": [{"task": problem.task_name(TARGET, "dev"), **DEV_METRIC.get(name, {"metric": "acc"})}],
        },
        "heldout": {
            "include_path": "tasks",
            "batch_size": 64,
            "objectives": [{"task": problem.task_name(TARGET, "test"), "metric": "acc"}],
        },
        "budget": {"trials": TRIALS, "heldout_top": HELDOUT_TOP},
        "driver": driver,
    }
    if hybrid:
        config["merge"] = "best_ps_cma.yaml"
    path = WORK / f"search_{name}.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def run_search(name: str) -> None:
    if SEARCHES[name][2]:
        restore_run("ps_cma")
        export_best_search("ps_cma")
    config = write_config(name)
    restore_run(name)
    cmd = [evomerge_cli(), "search", str(config), "--run-dir", str(RUNS / name)]
    print("$", " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True, env=ENV)
    archive_run(name)


def archive_run(name: str) -> None:
    """Copy a finished search's study into ARCHIVE."""
    common.archive_run(RUNS / name, ARCHIVE / name)


def restore_run(name: str) -> bool:
    """Put an archived study back under RUNS when RUNS lacks it (a fresh
    checkout), pointing its storage at the copy. True if the run is there."""
    return common.restore_run(RUNS / name, ARCHIVE / name, WORK / f"search_{name}.yaml")


def best_search_trial(name: str):
    """The run's store, and the best trial the search itself proposed
    (baselines excluded; None before any)."""
    from evomerge.run.store import RunStore

    store = RunStore.open(RUNS / name)
    return store, store.best("search")


def export_best_search(name: str) -> Path:
    from evomerge.app.export import export_best

    _, trial = best_search_trial(name)
    out = WORK / f"best_{name}.yaml"  # beside the models, so its paths stay inside its folder
    export_best(RUNS / name, out=out, trial=trial.number, progress=False)
    return out


# -- the table -------------------------------------------------------------------


def reported_models(searches: list[str], here: list[str]) -> list[dict]:
    """Rows: the base, the experts and the default merges (the baselines of
    the first search ``here``, the ones with a study: every search scores the
    same ones), then each search's best recipe, with evaluations and wall time."""
    from evomerge.app.export import export_best
    from evomerge.run.store import RunStore

    if not here:
        raise SystemExit("run.py: no search has run yet; run it without --table-only first")
    rows = []
    for t in RunStore.open(RUNS / here[0]).trials("baseline", everything=True):
        if t.status == "ok":
            out = WORK / "recipes" / f"baseline_{t.number}.yaml"
            export_best(RUNS / here[0], out=out, trial=t.number, progress=False)
            rows.append({"name": t.name, "recipe": out, "dev": t.metrics[DEV_ACC]})
    for name in searches:
        if name not in here:
            continue
        store, trial = best_search_trial(name)
        if trial is None:
            continue  # started, no candidate scored yet
        search = store.trials("search", everything=True)
        timing = [t for t in search if t.status == "ok" and not t.cached]
        rows.append(
            {
                "name": f"evolved: {name}",
                "recipe": export_best_search(name),
                "dev": trial.metrics[DEV_ACC],
                "trial": trial.number,
                "evaluations": len(search),
                "wall_min": store.elapsed / 60,
                "per_candidate": {
                    k: common.median([getattr(t, k) for t in timing])
                    for k in ("seconds", "merge_seconds", "eval_seconds")
                },
            }
        )
    return rows


def score_heldout(recipe: Path, cache: dict) -> dict[str, list[float]]:
    """Per-document accuracy of a recipe's merged model on the held-out tasks."""
    import lm_eval
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    from evomerge.engine.merge import merge_to_disk
    from evomerge.engine.recipe import load_recipe

    rec = load_recipe(recipe)
    key = rec.fingerprint()
    if key in cache:
        return cache[key]
    out = WORK / "final" / key[:16]
    if not (out / "config.json").is_file():
        merge_to_disk(rec, out, root=recipe.parent, allow_outside=True, overwrite=True, progress=False)
    lm = HFLM(pretrained=str(out), batch_size=64, device="cpu")
    tasks = lm_eval.tasks.get_task_dict(
        HELDOUT_TASKS, TaskManager(include_path=str(WORK / "tasks"), include_defaults=False)
    )
    res = lm_eval.evaluate(lm=lm, task_dict=tasks, bootstrap_iters=0, log_samples=True, verbosity="ERROR")
    per_doc = {
        name: [float(s["acc"]) for s in sorted(res["samples"][name], key=lambda s: s["doc_id"])]
        for name in HELDOUT_TASKS
    }
    shutil.rmtree(out)
    cache[key] = per_doc
    return per_doc


def mcnemar_p(a: list[float], b: list[float]) -> float:
    """Two-sided exact McNemar test (binomial on the discordant documents)."""
    wins = sum(1 for x, y in zip(a, b) if x > y)
    losses = sum(1 for x, y in zip(a, b) if x < y)
    n = wins + losses
    if n == 0:
        return 1.0
    k = min(wins, losses)
    tail = sum(math.comb(n, i) for i in range(k + 1)) / 2**n
    return min(1.0, 2 * tail)


def write_table(rows: list[dict], cache_file: Path, carried: dict[str, str] | None = None) -> str:
    """The held-out table. ``carried`` maps a search whose study is gone to
    its line in the previous table, kept as it was and marked."""
    cache = json.loads(cache_file.read_text()) if cache_file.is_file() else {}
    for row in rows:
        t0 = time.perf_counter()
        row["per_doc"] = score_heldout(row["recipe"], cache)
        cache_file.write_text(json.dumps(cache))
        print(f"scored {row['name']} in {time.perf_counter() - t0:.0f} s", flush=True)
    target = HELDOUT_TASKS[0]
    defaults = [r for r in rows if r["name"].split(" ")[0] in ("linear", "task_arithmetic", "ties", "dare_ties")]
    best_default = max(defaults, key=lambda r: r["dev"]) if defaults else None
    head = (
        "| model | target fr_math held-out acc (SE) | vs best default merge: diff (SE), McNemar p "
        "| math held-out | French held-out | target dev acc | evaluations | wall min |\n"
        "|---|---|---|---|---|---|---|---|\n"
    )
    lines = []
    for r in rows:
        cells = [r["name"]]
        for i, name in enumerate(HELDOUT_TASKS):
            m, se = mean_se(r["per_doc"][name])
            cells.append(f"{m:.3f} ({se:.3f})")
            if i == 0:
                if best_default is not None and r is not best_default and r["name"].startswith("evolved"):
                    diffs = [x - y for x, y in zip(r["per_doc"][target], best_default["per_doc"][target])]
                    d, dse = mean_se(diffs)
                    p = mcnemar_p(r["per_doc"][target], best_default["per_doc"][target])
                    cells.append(f"{d:+.3f} ({dse:.3f}), p={p:.3f}")
                else:
                    cells.append("")
        cells.append(f"{r['dev']:.3f}")
        cells.append(str(r.get("evaluations", "")))
        cells.append(f"{r['wall_min']:.0f}" if "wall_min" in r else "")
        lines.append("| " + " | ".join(cells) + " |")
    lines += marked(carried)
    note = (
        f"\nBest default merge on dev (the reference of the paired test): {best_default['name']}.\n"
        if best_default
        else ""
    )
    if carried:
        note += CARRIED_NOTE
    return head + "\n".join(lines) + "\n" + note


CARRIED_MARK = " (earlier run)"


def marked(carried: dict[str, str] | None) -> list[str]:
    """Carried lines, their first cell marked as coming from an earlier run."""
    return [line.replace(" |", CARRIED_MARK + " |", 1) for line in (carried or {}).values()]


CARRIED_NOTE = (
    "\nRows marked (earlier run) are copied from the previous table: their studies were not kept "
    "(they are now, in results/studies/), so they cannot be rescored here; their paired test is "
    "against the best default merge of that run.\n"
)


def previous_lines(table: str, searches: list[str], overfit: bool = False) -> dict[str, str]:
    """The lines of an earlier table.md for the given searches: the evolved
    rows of the first table, or the rows of the overfitting table."""
    found = {}
    for line in table.splitlines():
        line = line.replace(CARRIED_MARK, "")
        for name in searches:
            head = f"| {name} |" if overfit else f"| evolved: {name} |"
            if line.startswith(head):
                found[name] = line
    return found


def compare_with_cli(name: str = "ps_cma") -> dict:
    """One candidate (the search's best) as mergekit-yaml plus the lm_eval CLI,
    against evomerge's median time per candidate in that search."""
    from evomerge.app.export import export_best

    _, trial = best_search_trial(name)
    cfg = WORK / "recipes" / f"{name}_mergekit.yaml"
    export_best(RUNS / name, out=cfg, fmt="mergekit", trial=trial.number, progress=False)
    out = WORK / "compare_merged"
    shutil.rmtree(out, ignore_errors=True)
    bin_dir = Path(sys.executable).parent
    t0 = time.perf_counter()
    subprocess.run(
        [str(bin_dir / "mergekit-yaml"), str(cfg), str(out), "--random-seed", "0"], check=True, env=ENV, cwd=cfg.parent
    )
    merge_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    subprocess.run(
        [
            str(bin_dir / "lm_eval"),
            "--model", "hf",
            "--model_args", f"pretrained={out}",
            "--tasks", problem.task_name(TARGET, "dev"),
            "--include_path", str(WORK / "tasks"),
            "--batch_size", "64",
            "--device", "cpu",
        ],
        check=True,
        env=ENV,
        stdout=subprocess.DEVNULL,
    )  # fmt: skip
    eval_s = time.perf_counter() - t0
    shutil.rmtree(out)
    return {"mergekit_yaml_s": merge_s, "lm_eval_cli_s": eval_s, "total_s": merge_s + eval_s}


def overfit_table(here: list[str], carried: dict[str, str] | None = None) -> str:
    """Per search: the best trials by dev, their held-out scores, the gap."""
    lines = [
        "| search | trials scored on held-out | mean dev acc | mean held-out acc | dev - held-out "
        "| every search trial: mean dev acc |",
        "|---|---|---|---|---|---|",
    ]
    for name in here:
        store, _ = best_search_trial(name)
        ok = [t for t in store.trials("search", everything=True) if t.status == "ok"]
        scored = [t for t in ok if t.heldout_fitness is not None]
        if not scored:
            continue
        dev = sum(t.metrics[DEV_ACC] for t in scored) / len(scored)
        held = sum(t.heldout_fitness for t in scored) / len(scored)
        every = sum(t.metrics[DEV_ACC] for t in ok) / len(ok)
        lines.append(f"| {name} | {len(scored)} | {dev:.3f} | {held:.3f} | {dev - held:+.3f} | {every:.3f} |")
    lines += marked(carried)
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument(
        "--only", choices=list(SEARCHES), action="append", help="run (and tabulate) only this search (repeatable)"
    )
    ap.add_argument("--table-only", action="store_true", help="skip the searches; write the table")
    ap.add_argument("--no-table", action="store_true", help="run the searches only")
    ap.add_argument("--compare", action="store_true", help="also time mergekit-yaml + lm_eval CLI on one candidate")
    args = ap.parse_args(argv)
    paths = problem.build(WORK)
    print("built:", {k: str(v) for k, v in paths.items()}, flush=True)
    if not args.table_only:
        for name in args.only or SEARCHES:
            run_search(name)
    if args.no_table:
        return 0
    RESULTS.mkdir(exist_ok=True)
    tabulated = args.only or list(SEARCHES)
    here = [name for name in SEARCHES if restore_run(name)]  # the searches with a study
    rows = reported_models(tabulated, here)
    # A search in the table whose study is gone keeps its earlier line.
    gone = [name for name in tabulated if name not in here]
    previous = (RESULTS / "table.md").read_text() if (RESULTS / "table.md").is_file() else ""
    first, _, second = previous.partition("scored on held-out data:")
    carried = previous_lines(first, gone)
    table = write_table(rows, HELDOUT_SCORES, carried)
    table += "\nThe best trials of each search by dev, scored on held-out data:\n\n"
    table += overfit_table(here, previous_lines(second, [n for n in gone if n in carried], overfit=True))
    (RESULTS / "table.md").write_text(table)
    splice_table(HERE / "RESULTS.md", table)
    summary = {
        "trials_per_search": TRIALS,
        "searches": {name: {"space": s, "driver": d, "fixed_merge": h} for name, (s, d, h) in SEARCHES.items()},
        "rows": [
            {k: (str(v) if isinstance(v, Path) else v) for k, v in r.items() if k != "per_doc"}
            | {"heldout": {t: mean_se(r["per_doc"][t]) for t in HELDOUT_TASKS}}
            for r in rows
        ],
        "build": json.loads((WORK / "problem.json").read_text()),
    }
    old = json.loads((RESULTS / "results.json").read_text()) if (RESULTS / "results.json").is_file() else {}
    summary["rows"] += [
        r | {"carried": True} for r in old.get("rows", []) if r["name"].removeprefix("evolved: ") in carried
    ]
    if args.compare:
        summary["cli_candidate"] = compare_with_cli()
    elif "cli_candidate" in old:
        summary["cli_candidate"] = old["cli_candidate"]  # measured by an earlier --compare
    (RESULTS / "results.json").write_text(json.dumps(summary, indent=1) + "\n")
    print(table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
