"""The baselines a search is measured against, and their names.

Every source alone, then the default merges the sources allow (linear with
equal weights; with a base model, task arithmetic at weight 1 and TIES and
DARE-TIES at density 0.5). In a routing run each is an identity route: a
source over its own layers, a default merge (or the config's fixed merge)
over the merge's layers.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from evomerge.engine.recipe import MERGED, Recipe, Route, RouteStep, Source


def source_name(ref: str) -> str:
    """The baseline name of a source model alone."""
    return f"source {Path(ref).name}"


def is_source(name: str | None) -> bool:
    """Whether a baseline's name is a source alone's (else a default merge)."""
    return bool(name) and name.startswith("source ")


def plain_baselines(base: str | None, models: list[str], common: dict[str, Any]) -> list[tuple[str, Recipe]]:
    """``(name, recipe)`` for every source alone, then the default merges.
    ``common``: settings every recipe shares (dtype, seed)."""
    refs = [*([base] if base else []), *models]
    out = [(source_name(r), Recipe(method="passthrough", sources=[Source(model=r)], **common)) for r in refs]
    if len(models) < 2 and not base:
        return out
    every = [Source(model=m, parameters={"weight": 1.0}) for m in models]
    out.append(("linear (equal weights)", Recipe(method="linear", sources=every, **common)))
    if base:
        ta = [Source(model=base), *every]
        sparse = [Source(model=base), *(Source(model=m, parameters={"weight": 1.0, "density": 0.5}) for m in models)]
        for name, method, sources in (
            ("task_arithmetic (weight 1)", "task_arithmetic", ta),
            ("ties (density 0.5)", "ties", sparse),
            ("dare_ties (density 0.5)", "dare_ties", sparse),
        ):
            out.append((name, Recipe(method=method, sources=sources, base_model=base, **common)))
    return out


def routed_baselines(
    plain: list[tuple[str, Recipe]],
    depths: dict[str, int],
    common: dict[str, Any],
    *,
    can_merge: bool,
    fixed_merge: Recipe | None,
) -> list[tuple[str, Recipe]]:
    """The plain baselines as identity routes: each source over its own
    layers; each default merge over the merge's (when the sources can be
    merged and no fixed merge is given); and the fixed merge."""

    def identity(model: str) -> Route:
        return Route(layers=[RouteStep(model=model, layer=i) for i in range(depths[model])])

    out = []
    for name, recipe in plain:
        if recipe.method == "passthrough":
            ref = recipe.sources[0].model
            out.append((name, Recipe(sources=recipe.sources, route=identity(ref), **common)))
        elif can_merge and fixed_merge is None:
            out.append((name, recipe.model_copy(update={"route": identity(MERGED)})))
    if fixed_merge is not None:
        out.append(("the fixed merge", fixed_merge.model_copy(update={"route": identity(MERGED)})))
    return out
