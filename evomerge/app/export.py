"""The user-facing ends of a run: the status table and the exported recipe.

Both read a run folder through :mod:`evomerge.run.store` only (never the search
loop), so they work on a finished run, a running one and runs written by
earlier versions.
"""

from __future__ import annotations

import dataclasses
import os
import textwrap
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

import yaml

from evomerge.engine.folder import atomic_write
from evomerge.engine.recipe import Recipe
from evomerge.errors import EvomergeError
from evomerge.fitness.aggregate import Aggregate
from evomerge.fitness.race import Estimate, Verdict, estimate, selection_estimate
from evomerge.run.record import TrialRecord, best_of, rank_key
from evomerge.run.record import chosen as chosen_of
from evomerge.run.record import judged as judged_of
from evomerge.run.store import RunStore

PACKAGES = ("evomerge", "torch", "transformers", "safetensors", "optuna", "cma", "lm_eval", "mergekit")


def _versions() -> dict[str, str]:
    out = {}
    for name in PACKAGES:
        try:
            out[name] = metadata.version(name.replace("_", "-"))
        except metadata.PackageNotFoundError:
            continue
    return out


def describe_recipe(recipe: dict) -> str:
    """A short label: the method, and the route's depth."""
    parts = [recipe["method"]] if recipe.get("method") else []
    if recipe.get("route"):
        parts.append(f"route of {len(recipe['route']['layers'])} layers")
    return " + ".join(parts)


@dataclass
class Scores:
    """A run's trials with what judges them, read once for status, export
    and report: the chosen best and its rule, the race, the objective
    fitness rules of the dev, selection and held-out sets, and the verdict."""

    records: list[TrialRecord]
    chosen: TrialRecord | None
    rule: str  # "race" or "dev"
    race: dict[str, Any] | None
    selections: dict[int, dict[str, Any]]  # trial number -> its entry in the race's selection scores
    rules: dict[str, Aggregate]  # "eval", "select", "heldout" -> the section's fitness rule
    verdict: Verdict | None

    def dev(self, record: TrialRecord) -> Estimate | None:
        """Dev fitness, with its standard error from per-document scores; for
        a trial stopped early, its estimate's standard error against the
        full-dev fitness."""
        if record.stopped and record.fitness_se is not None and record.fitness is not None:
            return Estimate(record.fitness, record.fitness_se)
        return estimate(record.docs, record.fitness, self.rules["eval"])

    def selection(self, record: TrialRecord) -> Estimate | None:
        """Selection fitness on the documents the race scored it on; None
        for a trial that did not race."""
        return selection_estimate(self.selections.get(record.number), self.rules["select"])

    def heldout(self, record: TrialRecord) -> Estimate | None:
        return estimate(record.heldout_docs, record.heldout_fitness, self.rules["heldout"])

    @property
    def raced(self) -> bool:
        """A race ran to its end (it may have no winner: every entrant failed)."""
        return bool(self.race) and "rounds" in self.race

    def rule_text(self) -> str:
        """How the exported best was chosen, in words."""
        if self.rule == "race":
            entrants = len(self.race.get("entrants", []))
            return f"chosen by the selection race ({entrants} entrants)"
        if self.race and not self.raced:
            return "chosen by best dev fitness (the selection race has not finished: run the search again)"
        if self.raced:
            return "chosen by best dev fitness (every selection race entrant failed)"
        return "chosen by best dev fitness"


def read_scores(store: RunStore) -> Scores:
    """Everything :class:`Scores` holds, from an open run store."""
    records = store.trials()
    race = store.race()
    best, rule = chosen_of(records, race)
    rules = {section: store.aggregate(section) for section in ("eval", "select", "heldout")}
    selections = store.selections(race["fp"]) if race and race.get("fp") else {}
    judged = judged_of(records, race, rules["heldout"])
    return Scores(records, best, rule, race, selections, rules, judged)


def _se(value: Estimate | None) -> dict[str, float]:
    """``{"se": ...}`` when the estimate has a standard error."""
    return {"se": value.se} if value is not None and value.se is not None else {}


def _kept(rule: Aggregate, values: dict[str, float] | None) -> dict[str, Any]:
    """``{"kept": ...}``, each normalized objective's share of its reference kept, when there are some."""
    kept = rule.retention(values or {})
    return {"kept": kept} if kept else {}


def _cell(value: Estimate | None) -> str:
    return str(value) if value is not None else "-"


def _value_cell(values: dict[str, float], name: str, kept: dict[str, float]) -> str:
    if name not in values:
        return "-"
    return f"{values[name]:.4f}" + (f" ({100 * kept[name]:.0f}%)" if name in kept else "")


def _row(record: TrialRecord, objectives: list[str], scores: Scores) -> list[str]:
    kept = scores.rules["eval"].retention(record.values)
    mark = "*" if scores.chosen is not None and record.number == scores.chosen.number else ""
    mark = mark or ("~" if record.stopped else "")
    what = record.name if record.kind == "baseline" else f"search ({describe_recipe(record.recipe)})"
    if record.status != "ok":
        return [mark, str(record.number), what, "failed", (record.reason or "")[:60]]
    return [
        mark,
        str(record.number),
        what,
        _cell(scores.dev(record)),
        str(record.documents) if record.documents is not None else "-",
        *[_value_cell(record.values, o, kept) for o in objectives],
        _cell(scores.selection(record)),
        _cell(scores.heldout(record)),
    ]


def status_table(run_dir: str | Path, top: int = 10, store: RunStore | None = None) -> str:
    """The baselines and the top search trials of a run, as a text table.

    Search trials scored on every dev document come first, by dev fitness;
    trials stopped early (their fitness an estimate on part of the
    documents) follow while ``top`` allows. The exported best is always
    shown, marked ``*``; a stopped trial is marked ``~``. ``store``: the
    run's store when the caller has it open (the search that just ran).
    """
    store = store if store is not None else RunStore.open(run_dir)
    scores = read_scores(store)
    objectives = store.objectives
    baselines = [r for r in scores.records if r.kind == "baseline"]
    search = [r for r in scores.records if r.kind == "search"]
    failed = [r for r in search if r.status != "ok"]
    stopped = [r for r in search if r.ok and r.stopped]
    shown = [*sorted((r for r in search if r.complete), key=rank_key), *sorted(stopped, key=rank_key)][:top]
    best = scores.chosen
    if best is not None and best.kind == "search" and best.number not in {r.number for r in shown}:
        shown.append(best)
    header = ["", "trial", "what", "dev", "docs", *objectives, "selection", "held-out"]
    rows = [_row(r, objectives, scores) for r in [*baselines, *shown]]
    widths = [max(len(r[i]) for r in [header, *rows] if i < len(r)) for i in range(len(header))]
    table = ["  ".join(h.ljust(w) for h, w in zip(header, widths)).rstrip()]
    table.append("  ".join(("-" if h else " ") * w for h, w in zip(header, widths)))
    table += ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]

    unfinished = store.other_states().get("fail", 0)
    counts = [f"{len(failed)} failed"]
    config = store.record.get("config") or {}
    early = any((config.get(k) or {}).get("enabled") for k in ("early_stop", "fidelity"))
    if stopped or early:
        counts.append(f"{len(stopped)} stopped early")
    if unfinished:
        counts.append(f"{unfinished} stopped before finishing: interrupted or stale")
    summary = [
        f"{len(search)} search trials ({', '.join(counts)}), {len(baselines)} baselines, {store.elapsed / 60:.1f} min"
    ]
    scored = [r for r in search if r.ok and not r.cached and r.documents]
    if scored:
        documents = sum(r.documents for r in scored)
        summary[0] += f"; {documents:,} dev documents scored, {documents / len(scored):.0f} per candidate"
    if best is not None:
        what = f"trial {best.number}" + (f" ({best.name})" if best.kind == "baseline" else "")
        line = f"exported best: {what}, {scores.rule_text()}; dev {best.fitness:.4f}"
        top_base = best_of(baselines)
        if top_base is not None:
            line += f" against best baseline {top_base.fitness:.4f}"
        summary.append(line)
    notes = _notes(scores, [*baselines, *shown], rows)
    footer = ["; ".join(notes)] if notes else []
    if scores.verdict is not None:
        footer.append(f"verdict: {scores.verdict.line()}")
    return "\n".join([*_wrap(summary), *table, *_wrap(footer)])


def _notes(scores, listed: list, rows: list[list[str]]) -> list[str]:
    """What the status table's marks mean, for the marks it shows."""
    notes = []
    if scores.chosen is not None:
        notes.append("* exported best")
    if any(r.stopped for r in listed):
        notes.append("~ stopped early (dev fitness estimated from the docs it was scored on)")
    if any("±" in c for r in rows for c in r):
        stopped_se = any(r.stopped and r.fitness_se is not None for r in listed)
        notes.append("± 95% interval" + (" (for ~: of the estimate of the full-dev fitness)" if stopped_se else ""))
    if scores.rules["eval"].references:
        notes.append("(N%): the share of the reference kept (normalize: expert: of the best source's score)")
    if scores.selections:
        notes.append("selection: on the documents each entrant reached in the race")
    return notes


def _wrap(lines: list[str], width: int = 120) -> list[str]:
    """Lines of prose folded to ``width`` columns, continued indented; never
    inside ``p = 0.01`` or ``1.2 ±0.1`` (held by no-break spaces meanwhile)."""
    out = []
    for line in lines:
        line = line.replace(" = ", "\xa0=\xa0").replace(" ±", "\xa0±")
        out += [part.replace("\xa0", " ") for part in textwrap.wrap(line, width, subsequent_indent="  ")]
    return out


def export_best(
    run_dir: str | Path,
    out: str | Path | None = None,
    fmt: str = "evomerge",
    merge_dir: str | Path | None = None,
    trial: int | None = None,
    overwrite: bool = False,
    progress: bool = True,
    pick: str | None = None,
) -> tuple[Path, Recipe]:
    """Write the run's chosen best (or the given) trial's recipe, pinned and annotated.

    The chosen best is the selection race's winner when a race ran, else the
    best dev fitness (:meth:`RunStore.chosen`). The recipe names its sources
    by sha256, carries the seed, package versions, the search-space
    fingerprint, which rule chose it (``chosen_by``: race, dev, trial for a
    given ``trial``, or ``pick max-min`` / ``pick weighted`` for a point of
    the Pareto front chosen by ``pick``, see :mod:`evomerge.app.pareto`), the dev, selection and held-out scores (with their
    standard errors where per-document scores exist) and the paired
    held-out verdict against the best default merge in ``metadata``. Model
    paths are written relative to the recipe's folder when they lie inside
    it, absolute otherwise.
    """
    from evomerge.engine.merge import merge_to_disk, open_sources, pinned

    if fmt not in ("evomerge", "mergekit"):
        raise EvomergeError(f"unknown export format {fmt!r}; use evomerge or mergekit")
    run_dir = Path(run_dir)
    store = RunStore.open(run_dir)
    scores = read_scores(store)
    chosen, rule, judged = _pick(run_dir, scores, trial, pick)
    recipe = Recipe.model_validate(chosen.recipe)
    root = Path(store.record["config_path"]).parent
    sources = open_sources(recipe, root, allow_outside=True)
    recipe = pinned(recipe, sources)

    default_name = "best_recipe.yaml" if fmt == "evomerge" else "best_mergekit.yaml"
    out = Path(out) if out is not None else run_dir / default_name
    out_root = out.resolve().parent

    def where(ref: str | None) -> str | None:
        if ref is None or ref not in sources:
            return ref
        path = sources[ref].path.resolve()
        return os.path.relpath(path, out_root) if path.is_relative_to(out_root) else str(path)

    metadata = _export_metadata(run_dir, store, scores, chosen, rule, judged, recipe.seed)
    if pick is not None:
        metadata["pick"] = _pick_note(scores, pick)
    recipe = recipe.with_refs(where).model_copy(update={"metadata": {"evomerge": metadata}})
    if fmt == "evomerge":
        text = recipe.to_yaml()
    else:
        note = yaml.safe_dump({"evomerge": metadata}, sort_keys=False)
        text = "".join(f"# {line}\n" for line in note.splitlines()) + _mergekit_form(recipe, sources).to_mergekit_yaml()
    atomic_write(out, text)
    if merge_dir is not None:
        merge_to_disk(recipe, merge_dir, root=out_root, allow_outside=True, overwrite=overwrite, progress=progress)
    return out, recipe


def _pick(
    run_dir: Path, scores: Scores, trial: int | None, pick: str | None = None
) -> tuple[TrialRecord, str, Verdict | None]:
    """The trial to export (the run's chosen best, ``trial``, or the Pareto
    front's point ``pick`` chooses), the rule that chose it and its held-out
    verdict."""
    if pick is not None:
        from evomerge.app.pareto import pick as pick_point

        if trial is not None:
            raise EvomergeError("export was given both --trial and --pick; give one of them")
        chosen, _, judged = _pick(run_dir, scores, pick_point(scores.records, pick, scores.rules["eval"]).number)
        return chosen, f"pick {pick}", dataclasses.replace(judged, rule=f"pick {pick}") if judged else None
    if trial is None:
        if scores.chosen is None:
            raise EvomergeError(f"run {run_dir} has no successful trial yet; run the search longer")
        return scores.chosen, scores.rule, scores.verdict
    chosen = next((r for r in scores.records if r.number == trial), None)
    if chosen is None or chosen.status != "ok":
        raise EvomergeError(f"trial {trial} is not a successful trial of {run_dir}; see `evomerge status`")
    # The verdict of this trial, as if it were the run's chosen best.
    judged = judged_of(scores.records, {"winner": trial}, scores.rules["heldout"])
    return chosen, "trial", dataclasses.replace(judged, rule="trial") if judged is not None else None


def _pick_note(scores: Scores, how: str) -> dict[str, Any]:
    """What a ``--pick`` export chose from: the front and each point's shares kept."""
    from evomerge.app.pareto import front_of, share_references, shares

    rule = scores.rules["eval"]
    references = share_references(scores.records, rule)
    front = front_of(scores.records, rule)
    return {"rule": how, "front": {str(r.number): shares(r, references, rule) for r in front}}


def _export_metadata(
    run_dir: Path, store: RunStore, scores: Scores, chosen: TrialRecord, rule: str, judged, seed
) -> dict[str, Any]:
    """The ``metadata.evomerge`` block of an exported recipe: where it came
    from, which rule chose it, its scores and verdict, the package versions."""
    dev, selection, heldout = scores.dev(chosen), scores.selection(chosen), scores.heldout(chosen)
    return {
        "run": str(run_dir.resolve()),
        "trial": chosen.number,
        "kind": chosen.kind,
        **({"baseline": chosen.name} if chosen.name else {}),
        "recipe_fingerprint": chosen.fingerprint,
        "space_fingerprint": store.run_attr("space_fingerprint"),
        "config_fingerprint": store.run_attr("config_fingerprint"),
        "seed": seed,
        "chosen_by": rule,
        "dev": {
            "fitness": chosen.fitness,
            **_se(dev),
            **({"documents": chosen.documents} if chosen.documents is not None else {}),
            **({"stopped": True} if chosen.stopped else {}),
            "objectives": chosen.values,
            **_kept(scores.rules["eval"], chosen.values),
        },
        **({"selection": {"fitness": selection.value, **_se(selection)}} if selection else {}),
        "heldout": {
            "fitness": chosen.heldout_fitness,
            **_se(heldout),
            "objectives": chosen.heldout_values,
            **_kept(scores.rules["heldout"], chosen.heldout_values),
        }
        if chosen.heldout_values is not None
        else None,
        **({"verdict": judged.as_dict()} if judged is not None else {}),
        "versions": _versions(),
    }


def _mergekit_form(recipe: Recipe, sources) -> Recipe:
    """The recipe as mergekit can run it: a route becomes a passthrough
    config (with its scales folded), or an error when it cannot."""
    if recipe.route is None:
        return recipe
    from evomerge.engine.routing import FOLDABLE, route_to_passthrough

    config = next(iter(sources.values())).config
    tied = bool(config.get("tie_word_embeddings", False))
    projections = FOLDABLE.get(config.get("model_type"), ("o_proj", "down_proj"))
    passthrough = route_to_passthrough(recipe, tied, projections)
    if passthrough is None:
        raise EvomergeError(
            "this route runs layers of the recipe's own merge (or takes embeddings or head from another "
            "model than its first and last step's), which a mergekit passthrough config cannot express; "
            "export with --format evomerge"
        )
    return passthrough
