"""The user-facing ends of a run: the status table and the exported recipe."""

from __future__ import annotations

import os
from importlib import metadata
from pathlib import Path

import yaml

from evomerge.errors import EvomergeError
from evomerge.recipe import Recipe

PACKAGES = ("evomerge", "torch", "transformers", "safetensors", "optuna", "cma", "lm_eval", "mergekit")


def _versions() -> dict[str, str]:
    out = {}
    for name in PACKAGES:
        try:
            out[name] = metadata.version(name.replace("_", "-"))
        except metadata.PackageNotFoundError:
            continue
    return out


def _complete(study):
    import optuna

    return study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))


def _describe(recipe: dict) -> str:
    """A short label: the method, and the route's depth."""
    parts = [recipe["method"]] if recipe.get("method") else []
    if recipe.get("route"):
        parts.append(f"route of {len(recipe['route']['layers'])} layers")
    return " + ".join(parts)


def status_table(run_dir: str | Path, top: int = 10) -> str:
    """The baselines and the top search trials of a run, as a text table."""
    from evomerge.search import best_trial, open_study, trial_attrs

    study, record = open_study(run_dir)
    trials = _complete(study)
    objectives = study.user_attrs.get("objectives", [])
    baselines = [t for t in trials if t.user_attrs.get("kind") == "baseline"]
    search = [t for t in trials if t.user_attrs.get("kind") == "search"]
    failed = [t for t in search if t.user_attrs.get("status") != "ok"]
    ranked = sorted(
        (t for t in search if t.user_attrs.get("status") == "ok"),
        key=lambda t: (-t.user_attrs["fitness"], t.number),
    )
    header = ["trial", "what", "fitness", *objectives, "held-out"]
    rows = []
    for t in [*baselines, *ranked[:top]]:
        a = trial_attrs(study, t)
        what = a.get("name") if a.get("kind") == "baseline" else f"search ({_describe(a['recipe'])})"
        if a.get("status") != "ok":
            rows.append([str(t.number), what, "failed", a.get("reason", "")[:60]])
            continue
        values = a.get("values", {})
        rows.append(
            [
                str(t.number),
                what,
                f"{a['fitness']:.4f}",
                *[f"{values[o]:.4f}" if o in values else "-" for o in objectives],
                f"{a['heldout_fitness']:.4f}" if "heldout_fitness" in a else "-",
            ]
        )
    widths = [max(len(r[i]) for r in [header, *rows] if i < len(r)) for i in range(len(header))]
    lines = ["  ".join(h.ljust(w) for h, w in zip(header, widths))]
    lines.append("  ".join("-" * w for w in widths))
    lines += ["  ".join(c.ljust(w) for c, w in zip(r, widths)) for r in rows]
    best = best_trial(study)
    base_ok = [t.user_attrs["fitness"] for t in baselines if "fitness" in t.user_attrs]
    summary = (
        f"{len(search)} search trials ({len(failed)} failed), {len(baselines)} baselines, "
        f"{study.user_attrs.get('elapsed_s', 0) / 60:.1f} min"
    )
    if best is not None and base_ok:
        summary += (
            f"; best trial {best.number}: {best.user_attrs['fitness']:.4f} against best baseline {max(base_ok):.4f}"
        )
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
    from evomerge.merge import _pinned, merge_to_disk, open_sources
    from evomerge.search import best_trial, open_study, trial_attrs

    if fmt not in ("evomerge", "mergekit"):
        raise EvomergeError(f"unknown export format {fmt!r}; use evomerge or mergekit")
    run_dir = Path(run_dir)
    study, record = open_study(run_dir)
    if trial is None:
        chosen = best_trial(study)
        if chosen is None:
            raise EvomergeError(f"run {run_dir} has no successful trial yet; run the search longer")
    else:
        matches = [t for t in _complete(study) if t.number == trial]
        if not matches or matches[0].user_attrs.get("status") != "ok":
            raise EvomergeError(f"trial {trial} is not a successful trial of {run_dir}; see `evomerge status`")
        chosen = matches[0]
    a = trial_attrs(study, chosen)
    recipe = Recipe.model_validate(a["recipe"])
    root = Path(record["config_path"]).parent
    sources = open_sources(recipe, root, allow_outside=True)
    recipe = _pinned(recipe, sources)

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
                    "kind": a.get("kind"),
                    **({"baseline": a["name"]} if a.get("name") else {}),
                    "recipe_fingerprint": a.get("fingerprint"),
                    "space_fingerprint": study.user_attrs.get("space_fingerprint"),
                    "config_fingerprint": study.user_attrs.get("config_fingerprint"),
                    "seed": recipe.seed,
                    "dev": {"fitness": a.get("fitness"), "objectives": a.get("values", {})},
                    "heldout": {"fitness": a.get("heldout_fitness"), "objectives": a.get("heldout", {})}
                    if "heldout" in a
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
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_text(text)
    tmp.replace(out)
    if merge_dir is not None:
        merge_to_disk(recipe, merge_dir, root=out_root, allow_outside=True, overwrite=overwrite, progress=progress)
    return out, recipe
