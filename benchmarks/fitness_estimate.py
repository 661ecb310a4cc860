"""The cheap-fitness estimator's error, measured on stored searches' own candidates.

Every complete search candidate of a stored run holds its per-document dev
scores, and every baseline too. For each candidate, in trial order, and each
fraction of the documents (1/8, 1/4, 1/2 by default), this draws --draws
subsets per objective (the run seed's per-candidate draw, evomerge.fitness.estimate.draw,
with the draw number as the seed) and estimates the candidate's full-dev
fitness three ways, side by side:

  plain        the subset mean;
  references   the difference estimator with the baselines' per-document mean as its prediction;
  pooled       the difference estimator with the baselines and the earlier candidates pooled
               per document (evomerge.fitness.estimate.prediction: what a live search has).

It prints, per run and fraction, the mean absolute error against the full-dev
fitness and the Spearman rank correlation between the estimates and the
full-dev fitness over the run's candidates (mean over draws). No model is run.

Usage:
    .venv/bin/python benchmarks/fitness_estimate.py [RUN_DIR ...] [--fractions 0.125,0.25,0.5] [--draws 20]
        [--pooled-by-seed]

With --pooled-by-seed, runs named ``NAME_SEED`` (benchmarks/selection.py's
run folders, e.g. /tmp/evomerge_selection/runs/demo_plain_0 ... _4) are also
summarised per NAME: the mean and standard error over seeds of each number.

Default runs: the stored SmolLM2 multiskill searches (experiments/smollm2_multiskill/results/studies/*).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import numpy as np

from evomerge.fitness.estimate import combine, difference, draw, plain_mean, prediction
from evomerge.run.store import RunStore

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_RUNS = sorted((ROOT / "experiments/smollm2_multiskill/results/studies").glob("*"))
ARMS = ("plain", "references", "pooled")


def spearman(a, b) -> float:
    """Spearman's rank correlation (average ranks for ties)."""

    def ranks(x):
        x = np.asarray(x, dtype=float)
        order = np.argsort(x, kind="stable")
        r = np.empty(len(x))
        r[order] = np.arange(len(x))
        for value in np.unique(x):  # ties share their mean rank
            tied = x == value
            r[tied] = r[tied].mean()
        return r

    ra, rb = ranks(a), ranks(b)
    if ra.std() == 0 or rb.std() == 0:
        return math.nan
    return float(np.corrcoef(ra, rb)[0, 1])


def load(run_dir: Path):
    """The run's references, complete candidates (trial order) and objective weights."""
    store = RunStore.open(run_dir)
    baselines = [b for b in store.trials("baseline", heldout=False) if b.complete and b.docs]
    candidates = [r for r in store.trials("search", heldout=False) if r.complete and r.docs and not r.cached]
    candidates.sort(key=lambda r: r.number)
    weights = dict(store.aggregate().weights)
    if not baselines or not candidates:
        return None
    names = [n for n in candidates[0].docs if n in weights]
    references = {n: np.array([b.docs[n] for b in baselines], dtype=float) for n in names}
    return references, candidates, {n: weights[n] for n in names}


def measure(run_dir: Path, fractions: list[float], draws: int) -> list[dict]:
    loaded = load(run_dir)
    if loaded is None:
        print(f"{run_dir}: no complete candidates with per-document scores; skipped", file=sys.stderr)
        return []
    references, candidates, weights = loaded
    full = [sum(w * np.mean(c.docs[n]) for n, w in weights.items()) for c in candidates]
    rows = []
    for fraction in fractions:
        errors = {arm: [] for arm in ARMS}
        rhos = {arm: [] for arm in ARMS}
        for d in range(draws):
            estimates = {arm: [] for arm in ARMS}
            for i, cand in enumerate(candidates):
                parts = {arm: {} for arm in ARMS}
                for name in weights:
                    y_all = np.asarray(cand.docs[name], dtype=float)
                    total = len(y_all)
                    scored = draw(d, cand.number, name, total)[: math.ceil(fraction * total)]
                    y = y_all[scored]
                    earlier = [dict(enumerate(c.docs[name])) for c in candidates[:i]]
                    parts["plain"][name] = plain_mean(y, total)
                    parts["references"][name] = difference(scored, y, prediction(references[name]))
                    parts["pooled"][name] = difference(scored, y, prediction(references[name], earlier))
                for arm in ARMS:
                    value = combine(parts[arm], weights).value
                    estimates[arm].append(value)
                    errors[arm].append(abs(value - full[i]))
            for arm in ARMS:
                rhos[arm].append(spearman(estimates[arm], full))
        row = {"run": run_dir.name, "fraction": fraction, "candidates": len(candidates), "draws": draws}
        for arm in ARMS:
            row[f"{arm}_mae"] = float(np.mean(errors[arm]))
            row[f"{arm}_spearman"] = float(np.nanmean(rhos[arm]))
        rows.append(row)
        print(json.dumps(row), file=sys.stderr, flush=True)
    return rows


def markdown(rows: list[dict]) -> str:
    head = (
        "| run | candidates | fraction | plain MAE | references MAE | pooled MAE | pooled / plain MAE | "
        "plain Spearman | references Spearman | pooled Spearman |\n|---|---|---|---|---|---|---|---|---|---|"
    )
    lines = [head]
    for r in rows:
        lines.append(
            f"| {r['run']} | {r['candidates']} | {r['fraction']:g} | {r['plain_mae']:.4f} | {r['references_mae']:.4f} | "
            f"{r['pooled_mae']:.4f} | {r['pooled_mae'] / r['plain_mae']:.2f} | {r['plain_spearman']:.3f} | "
            f"{r['references_spearman']:.3f} | {r['pooled_spearman']:.3f} |"
        )
    return "\n".join(lines)


def by_seed(rows: list[dict]) -> str:
    """Mean ± standard error over seeds, per run name without its ``_SEED``."""
    groups: dict[tuple[str, float], list[dict]] = {}
    for r in rows:
        groups.setdefault((r["run"].rsplit("_", 1)[0], r["fraction"]), []).append(r)

    def mean_se(values) -> str:
        values = np.asarray(values, dtype=float)
        se = values.std(ddof=1) / math.sqrt(len(values)) if len(values) > 1 else 0.0
        return f"{values.mean():.4f} ± {se:.4f}"

    lines = [
        "| runs | seeds | fraction | plain MAE | pooled MAE | pooled / plain MAE | plain Spearman | pooled Spearman |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for (name, fraction), rs in groups.items():
        lines.append(
            f"| {name} | {len(rs)} | {fraction:g} | {mean_se([r['plain_mae'] for r in rs])} "
            f"| {mean_se([r['pooled_mae'] for r in rs])} "
            f"| {mean_se([r['pooled_mae'] / r['plain_mae'] for r in rs])} "
            f"| {mean_se([r['plain_spearman'] for r in rs])} | {mean_se([r['pooled_spearman'] for r in rs])} |"
        )
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("runs", nargs="*", type=Path, default=DEFAULT_RUNS, help="run folders (default: the stored ones)")
    p.add_argument("--fractions", default="0.125,0.25,0.5")
    p.add_argument("--draws", type=int, default=20)
    p.add_argument("--json", help="also write the rows here")
    p.add_argument("--pooled-by-seed", action="store_true", help="also summarise runs NAME_SEED per NAME")
    args = p.parse_args()
    fractions = [float(f) for f in args.fractions.split(",")]
    rows = [row for run in args.runs for row in measure(run, fractions, args.draws)]
    print(markdown(rows))
    if args.pooled_by_seed:
        print()
        print(by_seed(rows))
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
