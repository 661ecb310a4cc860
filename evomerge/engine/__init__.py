"""The merge engine: read sources, plan a recipe, merge it in place into a live
model or stream it to a folder.

It knows nothing of the search around it: it never imports optuna, cma,
lm_eval, ray or the packages above it (``search``, ``fitness``, ``run``,
``app``), so a user can merge a recipe with it alone::

    from evomerge.engine import load_recipe, merge_to_disk
    merge_to_disk(load_recipe("recipe.yaml"), "merged/")
"""

from typing import Any

__all__ = ["InPlaceMerger", "Recipe", "load_recipe", "merge_to_disk"]

_WHERE = {
    "InPlaceMerger": "evomerge.engine.inplace",
    "Recipe": "evomerge.engine.recipe",
    "load_recipe": "evomerge.engine.recipe",
    "merge_to_disk": "evomerge.engine.merge",
}


def __getattr__(name: str) -> Any:
    # Lazy, so that importing a submodule does not load torch.
    if name in _WHERE:
        import importlib

        return getattr(importlib.import_module(_WHERE[name]), name)
    raise AttributeError(f"module 'evomerge.engine' has no attribute {name!r}")
