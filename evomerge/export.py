"""The user-facing ends of a run: the status table and the exported recipe.

Both read a run folder through :mod:`evomerge.store` only (never the search
loop), so they work on a finished run, a running one and runs written by
earlier versions.
"""

from __future__ import annotations

import os
from importlib import metadata
from pathlib import Path

import yaml

from evomerge.errors import EvomergeError
from evomerge.recipe import Recipe
from evomerge.store import RunStore, TrialRecord, atomic_write, best_of, rank_key

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


def _row(record: TrialRecord, objectives: list[str]) -> list[str]:
    what = record.name if record.kind == "baseline" else f"search ({describe_recipe(record.recipe)})"
    if record.status != "ok":
        return [str(record.number), what, "failed", (record.reason or "")[:60]]
    return [
        str(record.number),
        what,
        f"{record.fitness:.4f}",
        *[f"{record.values[o]:.4f}" if o in record.values else "-" for o in objectives],
        f"{record.heldout_fitness:.4f}" if record.heldout_fitness is not None else "-",
    ]


def status_table(run_dir: str | Path, top: int = 10) -> str:
    """The baselines and the top search trials of a run, as a text table."""
    store = RunStore.open(run_dir)
    objectives = store.objectives
    baselines = store.trials("baseline")
    search = store.trials("search")
    failed = [r for r in search if r.status != "ok"]
    ranked = sorted((r for r in search if r.status == "ok"), key=rank_key)
    header = ["trial", "what", "fitness", *objectives, "held-out"]
    rows = [_row(r, objectives) for r in [*baselines, *ranked[:top]]]
    widths = [max(len(r[i]) for r in [header, *rows] if i < len(r)) for i in range(len(header))]
    lines = ["  ".join(h.ljust(w) for h, w in zip(header, widths))]
    lines.append("  ".join("-" * w for w in widths))
    lines += ["  ".join(c.ljust(w) for c, w in zip(r, widths)) for r in rows]
    best = best_of(baselines + search)
    base_ok = [r.fitness for r in baselines if r.fitness is not None]
    stopped = store.other_states().get("fail", 0)
    unfinished = f", {stopped} stopped before finishing: interrupted or stale" if stopped else ""
    summary = (
        f"{len(search)} search trials ({len(failed)} failed{unfinished}), {len(baselines)} baselines, "
        f"{store.elapsed / 60:.1f} min"
    )
    if best is not None and base_ok:
        summary += f"; best trial {best.number}: {best.fitness:.4f} against best baseline {max(base_ok):.4f}"
    return "\n".join([summary, *lines])


def export_best(
    run_dir: str | Path,
    out: str | Path | None = None,
    fmt: str = "evomerge",
    merge_dir: str | Path | None = None,
    trial: int | None = None,
    overwrite: bool = False,
    progress: bool = True,
) -> tuple[Path, Recipe]:
    """Write the best (or the given) trial's recipe, pinned and annotated.

    The recipe names its sources by sha256, carries the seed, package
    versions, the search-space fingerprint and the dev and held-out scores in
    ``metadata``. Model paths are written relative to the recipe's folder
    when they lie inside it, absolute otherwise.
    """
    from evomerge.merge import merge_to_disk, open_sources, pinned

    if fmt not in ("evomerge", "mergekit"):
        raise EvomergeError(f"unknown export format {fmt!r}; use evomerge or mergekit")
    run_dir = Path(run_dir)
    store = RunStore.open(run_dir)
    if trial is None:
        chosen = store.best()
        if chosen is None:
            raise EvomergeError(f"run {run_dir} has no successful trial yet; run the search longer")
    else:
        chosen = store.trial(trial)
        if chosen is None or chosen.status != "ok":
            raise EvomergeError(f"trial {trial} is not a successful trial of {run_dir}; see `evomerge status`")
    recipe = Recipe.model_validate(chosen.recipe)
    root = Path(store.record["config_path"]).parent
    sources = open_sources(recipe, root, allow_outside=True)
    recipe = pinned(recipe, sources)

    out = (
        Path(out) if out is not None else run_dir / ("best_recipe.yaml" if fmt == "evomerge" else "best_mergekit.yaml")
    )
    out_root = out.resolve().parent

    def where(ref: str | None) -> str | None:
        if ref is None or ref not in sources:
            return ref
        path = sources[ref].path.resolve()
        return os.path.relpath(path, out_root) if path.is_relative_to(out_root) else str(path)

    recipe = recipe.with_refs(where).model_copy(
        update={
            "metadata": {
                "evomerge": {
                    "run": str(run_dir.resolve()),
                    "trial": chosen.number,
                    "kind": chosen.kind,
                    **({"baseline": chosen.name} if chosen.name else {}),
                    "recipe_fingerprint": chosen.fingerprint,
                    "space_fingerprint": store.run_attr("space_fingerprint"),
                    "config_fingerprint": store.run_attr("config_fingerprint"),
                    "seed": recipe.seed,
                    "dev": {"fitness": chosen.fitness, "objectives": chosen.values},
                    "heldout": {"fitness": chosen.heldout_fitness, "objectives": chosen.heldout_values}
                    if chosen.heldout_values is not None
                    else None,
                    "versions": _versions(),
                }
            },
        }
    )
    mergekit_form = recipe
    if fmt == "mergekit" and recipe.route is not None:
        from evomerge.routing import FOLDABLE, route_to_passthrough

        config = next(iter(sources.values())).config
        tied = bool(config.get("tie_word_embeddings", False))
        projections = FOLDABLE.get(config.get("model_type"), ("o_proj", "down_proj"))
        mergekit_form = route_to_passthrough(recipe, tied, projections)
        if mergekit_form is None:
            raise EvomergeError(
                "this route runs layers of the recipe's own merge (or takes embeddings or head from another "
                "model than its first and last step's), which a mergekit passthrough config cannot express; "
                "export with --format evomerge"
            )
    if fmt == "evomerge":
        text = recipe.to_yaml()
    else:
        note = yaml.safe_dump({"evomerge": recipe.metadata["evomerge"]}, sort_keys=False)
        text = "".join(f"# {line}\n" for line in note.splitlines()) + mergekit_form.to_mergekit_yaml()
    atomic_write(out, text)
    if merge_dir is not None:
        merge_to_disk(recipe, merge_dir, root=out_root, allow_outside=True, overwrite=overwrite, progress=progress)
    return out, recipe
