"""Search merges of three SmolLM2-135M experts into one model that keeps all
three skills, and write the held-out results table (issue 19).

One command runs everything; running it again resumes where it stopped (the
experts are cached, finished searches report at once, an interrupted search
continues from its study):

    .venv/bin/python experiments/smollm2_multiskill/run.py

Steps: build the base, the experts and the tasks (``problem.py``); run the
searches with ``evomerge search`` (each scores its baselines, its winner and
its best trials by dev on the held-out splits itself, in place, one record
per document: the sources give the cross-table and each expert's ceiling);
write ``results/table.md``, ``results/results.json`` and an ``evomerge
report`` page per search, and splice the table into RESULTS.md. ``--only NAME`` runs one search (two can run side
by side, each in its own process); ``--table-only`` skips the build and the searches: it needs only the
studies, so a fresh checkout remakes the table from ``results/studies``.

Every number that decides the comparison was fixed before any merge was
scored on held-out data: the problem and its splits (``problem.py``), the
space, the drivers, the dev subset and the document budget below.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path
from typing import NamedTuple

HERE = Path(__file__).resolve().parent
WORK = HERE / "work"
RUNS = HERE / "runs"
RESULTS = HERE / "results"
ARCHIVE = RESULTS / "studies"  # committed copies of finished studies (RUNS and WORK are not committed)
sys.path.insert(0, str(HERE.parent))

import common  # noqa: E402
from common import ENV, evomerge_cli, mean_se  # noqa: E402

problem = common.load_module(HERE / "problem.py")

SKILLS = problem.SKILLS
# The parameter space: the Evolutionary Model Merge paper's layer-wise
# DARE-TIES (a weight and a density per model per block of layers), with
# blocks of 10 of SmolLM2's 30 layers: 3 blocks x 3 experts x 2 = 18 dimensions.
PS_SPACE = {
    "methods": ["dare_ties"],
    "search": {"weight": {"per": "block", "block": 10}, "density": {"per": "block", "block": 10}},
    "fixed": {"lambda": 1.0},
}
# The fixed dev subset every search optimises on: this many of each skill's
# 200 dev documents (the same ones in every search).
DEV_SAMPLES = 100
# Dev documents the search trials of a search with selection may score: 80
# candidates scored in full (early stopping scores fewer per candidate, so
# more candidates fit). The race adds RACE_DOCUMENTS (16 entrants: the 8
# baselines and the 8 best trials by dev, on the 3 x 200 selection
# documents; ``evomerge.fitness.race.cost``).
DOCUMENTS = 24_000
RACE_DOCUMENTS = 3_000
CMA = {"name": "cma", "popsize": 10, "sigma0": 0.2, "restarts": 0}
TPE = {"name": "tpe", "startup_trials": 10}


class Search(NamedTuple):
    driver: dict
    select: bool  # selection race and early stopping
    keep: bool = False  # fitness: the worst-kept skill (each normalized by the best source), not the mean
    fidelity: bool = False  # multi-fidelity scoring (its defaults)


SEARCHES = {
    # evomerge: early stopping against the incumbent, then a race of the top 8
    # and the baselines on the selection split; the race's winner is exported.
    "ps_cma_select": Search(CMA, True),
    "ps_tpe_select": Search(TPE, True),
    # mergekit-evolve's way: CMA-ES on the fixed dev subset, every candidate
    # scored in full, the best dev score exported; the same documents in all
    # (DOCUMENTS + RACE_DOCUMENTS, all spent on search trials).
    "ps_cma_evolve": Search(CMA, False),
    # Issue 31, keeping every skill: ps_cma_evolve's protocol (CMA-ES, all the
    # documents on search trials, the best dev exported), with the fitness the
    # min over the skills of accuracy / the best source's accuracy
    # (normalize: expert, fitness: {aggregate: min}); then the same with
    # multi-fidelity scoring, whose saved documents buy more candidates.
    "ps_cma_min": Search(CMA, False, keep=True),
    "ps_cma_min_fidelity": Search(CMA, False, keep=True, fidelity=True),
}
ANCHOR = "ps_cma_evolve"  # what the keep-every-skill searches are compared with, paired
HELDOUT_TOP = 3  # each search's best trials by dev scored on held-out: the dev/held-out gap
# The search whose baselines the table shows (every search scores the same
# baselines, on dev and on held-out).
BASELINE_RUN = "ps_cma_select"


def objectives(split: str, keep: bool = False) -> list[dict]:
    """One objective per skill, weighted so that the fitness is the mean
    accuracy; with ``keep``, each normalized by the best source (weight 1:
    the fitness, a min, is the worst share kept)."""
    if keep:
        return [{"task": problem.task_name(s, split), "metric": "acc", "normalize": "expert"} for s in SKILLS]
    return [{"task": problem.task_name(s, split), "metric": "acc", "weight": 1 / len(SKILLS)} for s in SKILLS]


def write_config(name: str) -> Path:
    """The search config of one search, in WORK (its paths are relative to it)."""
    import yaml

    driver, select, keep, fidelity = SEARCHES[name]
    config = {
        "base_model": "models/base",
        "models": [f"models/expert_{s}" for s in SKILLS],
        "space": PS_SPACE,
        "dtype": "float32",
        "seed": 0,
        "eval": {
            "include_path": "tasks",
            "batch_size": 64,
            "samples": DEV_SAMPLES,
            "objectives": objectives("dev", keep),
        },
        "heldout": {"include_path": "tasks", "batch_size": 64, "objectives": objectives("heldout", keep)},
        "budget": {"documents": DOCUMENTS if select else DOCUMENTS + RACE_DOCUMENTS, "heldout_top": HELDOUT_TOP},
        "driver": driver,
    }
    if select:
        config["select"] = {"objectives": objectives("select"), "top": 8}
        config["early_stop"] = {"enabled": True}
    if keep:
        config["fitness"] = {"aggregate": "min"}
    if fidelity:
        config["fidelity"] = {"enabled": True}
    path = config_path(name)
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def config_path(name: str) -> Path:
    return WORK / f"search_{name}.yaml"


def run_search(name: str) -> None:
    config = write_config(name)
    restore_run(name)
    cmd = [evomerge_cli(), "search", str(config), "--run-dir", str(RUNS / name)]
    print("$", " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True, env=ENV)
    common.archive_run(RUNS / name, ARCHIVE / name)


def restore_run(name: str) -> bool:
    return common.restore_run(RUNS / name, ARCHIVE / name, config_path(name))


# -- the table -------------------------------------------------------------------

HELDOUT = {s: f"{problem.task_name(s, 'heldout')}/acc" for s in SKILLS}
DEV_FIT = "dev fitness"


def rows_of(here: list[str]) -> tuple[list[dict], dict]:
    """The table's rows (the baselines of BASELINE_RUN, or of the first search here, then per search its
    exported recipe and, when that is not the same trial, its best by dev),
    and per search its summary."""
    from evomerge.run.store import RunStore

    def row(name: str, t, search: str | None = None) -> dict:
        return {
            "name": name,
            "search": search,
            "trial": t.number,
            "dev": sum(t.values.values()) / len(t.values),  # mean dev accuracy, whatever the search's fitness
            "selection": None,
            "heldout_docs": {s: list(t.heldout_docs[k]) for s, k in HELDOUT.items()} if t.heldout_docs else None,
        }

    rows, searches = [], {}
    for t in RunStore.open(RUNS / (BASELINE_RUN if BASELINE_RUN in here else here[0])).trials("baseline"):
        if t.ok:
            rows.append(row(t.name, t))
    for name in here:
        store = RunStore.open(RUNS / name)
        winner, rule = store.chosen()
        if winner is None:
            continue
        search = store.trials("search", everything=True)
        full = [t for t in search if t.complete and not t.cached]
        best_dev = store.best("search")
        race = store.race() or {}
        selection = _selection_fitness(store, race)
        searches[name] = {
            "candidates": len(search),
            "stopped": sum(1 for t in search if t.stopped),
            "search_documents": sum(t.documents or 0 for t in search if not t.cached),
            "race_documents": race.get("documents", 0),
            "wall_min": round(store.elapsed / 60, 1),
            "median_s_full_candidate": round(common.median([t.seconds for t in full]), 2),
            "exported": winner.number,
            "chosen_by": rule,
            "gap": _gap(store),
        }
        r = row(f"{name}: exported ({'race winner' if race.get('winner') is not None else 'best dev'})", winner, name)
        r["selection"] = selection.get(winner.number)
        rows.append(r)
        if best_dev is not None and best_dev.number != winner.number:
            r = row(f"{name}: best dev", best_dev, name)
            r["selection"] = selection.get(best_dev.number)
            rows.append(r)
    return rows, searches


def _selection_fitness(store, race: dict) -> dict[int, float]:
    """Trial number -> its selection fitness (mean accuracy on the selection
    documents it was scored on in the race)."""
    if not race:
        return {}
    out = {}
    for number, entry in store.selections(race["fp"]).items():
        docs = entry.get("docs")
        if docs:
            out[number] = sum(sum(v) / len(v) for v in docs.values()) / len(docs)
    return out


def _gap(store) -> dict:
    """The best search trials by dev scored on held-out: their mean dev and held-out accuracy."""
    scored = [t for t in store.ranked("search") if t.heldout_fitness is not None][:HELDOUT_TOP]
    if not scored:
        return {}
    dev = sum(sum(t.values.values()) / len(t.values) for t in scored) / len(scored)  # mean accuracy
    held = sum(sum(t.heldout_values.values()) / len(t.heldout_values) for t in scored) / len(scored)
    return {"trials": len(scored), "dev": round(dev, 4), "heldout": round(held, 4)}


def _paired_cell(r: dict, key: str, tests: dict) -> str:
    """A row's paired held-out tests (name -> Paired) as one cell, kept in ``r[key]``."""
    r[key] = {name: {"diff": p.diff, "se": p.se, "p": p.p} for name, p in tests.items()}
    return "; ".join(f"{p.diff:+.3f} ({p.se:.3f}), p={p.p:.3f}" for p in tests.values())


def _cells(r: dict, ceiling: dict, best_default: dict | None, anchor: dict | None) -> list[str]:
    """A model's row of the held-out table (see :func:`write_table`)."""
    from evomerge.fitness.aggregate import Aggregate
    from evomerge.fitness.baselines import is_source
    from evomerge.fitness.paired import paired

    docs = r["heldout_docs"]
    weights = {s: 1 / len(SKILLS) for s in SKILLS}
    accs = {s: mean_se(docs[s]) for s in SKILLS}
    mean = sum(m for m, _ in accs.values()) / len(SKILLS)
    se = sum(s_**2 for _, s_ in accs.values()) ** 0.5 / len(SKILLS)
    r["heldout"] = {s: accs[s] for s in SKILLS} | {"mean": (mean, se)}
    cells = [r["name"], *[f"{m:.3f} ({se:.3f})" for m, se in accs.values()], f"**{mean:.3f}** ({se:.3f})"]
    worst = None
    if len(ceiling) == len(SKILLS):
        norm = [accs[s][0] / ceiling[s] for s in SKILLS]
        r["normalized"] = dict(zip(SKILLS, norm))
        cells.append(" / ".join(f"{n:.2f}" for n in norm) + f" / **{sum(norm) / len(norm):.2f}**")
        cells.append(f"{min(norm):.2f} ({SKILLS[norm.index(min(norm))]})")
        worst = Aggregate({s: 1.0 for s in SKILLS}, ceiling, "min")
    else:
        cells += ["", ""]
    cell = ""
    if best_default is not None and r is not best_default and not (r["search"] is None and is_source(r["name"])):
        cell = _paired_cell(r, "vs_best_default", {"mean": paired(docs, best_default["heldout_docs"], weights)})
        r["vs_best_default"] = r["vs_best_default"]["mean"]
    cells.append(cell)
    cell = ""
    if anchor is not None and worst is not None and r["search"] not in (None, ANCHOR):
        theirs = anchor["heldout_docs"]
        cell = _paired_cell(
            r, "vs_anchor", {"mean": paired(docs, theirs, weights), "worst": paired(docs, theirs, worst)}
        )
    cells.append(cell)
    cells.append(f"{r['dev']:.3f}")
    cells.append(f"{r['selection']:.3f}" if r["selection"] is not None else "")
    return cells


def write_table(rows: list[dict], searches: dict) -> str:
    """The held-out table: per model, each skill's accuracy, the mean, the
    shares of each expert kept and the worst of them, the paired tests
    against the best default merge (mean accuracy) and against ANCHOR's
    export (mean accuracy; worst-kept share, by the min aggregate's paired
    difference, :mod:`evomerge.fitness.aggregate`); then per search its
    summary."""
    from evomerge.fitness.baselines import is_source

    scored = [r for r in rows if r["heldout_docs"]]
    ceiling = {}
    for s in SKILLS:
        expert = next((r for r in scored if r["name"] == f"source expert_{s}"), None)
        if expert is not None:
            ceiling[s] = mean_se(expert["heldout_docs"][s])[0]
    defaults = [r for r in scored if r["search"] is None and not is_source(r["name"])]
    best_default = max(defaults, key=lambda r: r["dev"]) if defaults else None
    anchor = next((r for r in scored if r["search"] == ANCHOR and "exported" in r["name"]), None)
    head = (
        "| model | math | french | rev | mean (SE) | normalized: math / french / rev / mean | worst kept "
        f"| vs best default merge: diff (SE), p | vs {ANCHOR}: mean diff (SE), p; worst kept diff (SE), p "
        "| dev | selection |\n"
        "|---|---|---|---|---|---|---|---|---|---|---|\n"
    )
    lines = ["| " + " | ".join(_cells(r, ceiling, best_default, anchor)) + " |" for r in scored]
    note = (
        f"\nBest default merge by dev (the reference of the paired test): {best_default['name']}.\n"
        if best_default
        else ""
    )
    table = head + "\n".join(lines) + "\n" + note
    table += (
        "\n| search | candidates (stopped early) | dev documents + race documents | wall min "
        "| s per full candidate | exported trial (chosen by) | top-3 by dev: mean dev | their mean held-out "
        "| dev - held-out |\n|---|---|---|---|---|---|---|---|---|\n"
    )
    for name, s in searches.items():
        g = s["gap"]
        gap = f"{g['dev']:.3f} | {g['heldout']:.3f} | {g['dev'] - g['heldout']:+.3f}" if g else " | | "
        table += (
            f"| {name} | {s['candidates']} ({s['stopped']}) | {s['search_documents']} + {s['race_documents']} "
            f"| {s['wall_min']:.0f} | {s['median_s_full_candidate']:.1f} | {s['exported']} ({s['chosen_by']}) | {gap} |\n"
        )
    return table


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", choices=list(SEARCHES), action="append", help="run only this search (repeatable)")
    ap.add_argument("--table-only", action="store_true", help="skip the searches; write the table")
    ap.add_argument("--no-table", action="store_true", help="run the searches only")
    args = ap.parse_args(argv)
    if not args.table_only:
        paths = problem.build(WORK)
        print("built:", {k: str(v) for k, v in paths.items()}, flush=True)
        for name in args.only or SEARCHES:
            run_search(name)
    if args.no_table:
        return 0
    WORK.mkdir(exist_ok=True)
    for name in SEARCHES:
        write_config(name)  # a fresh checkout: restored studies point at these
    here = [name for name in SEARCHES if restore_run(name)]
    if not here:
        raise SystemExit("run.py: no search has run yet; run it without --table-only first")
    rows, searches = rows_of(here)
    table = write_table(rows, searches)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "table.md").write_text(table)
    common.splice_table(HERE / "RESULTS.md", table)
    summary = {
        "settings": {
            "space": PS_SPACE,
            "dev_samples": DEV_SAMPLES,
            "documents": DOCUMENTS,
            "race_documents": RACE_DOCUMENTS,
            "searches": {n: s._asdict() for n, s in SEARCHES.items()},
        },
        "searches": searches,
        "rows": [{k: v for k, v in r.items() if k != "heldout_docs"} for r in rows],
        "finetune": problem.FINETUNE,
    }
    (RESULTS / "results.json").write_text(json.dumps(summary, indent=1) + "\n")
    for name in here:  # an HTML report per search, readable offline
        out = RESULTS / f"report_{name}.html"
        subprocess.run([evomerge_cli(), "report", str(RUNS / name), "--out", str(out)], check=True, env=ENV)
    print(table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
