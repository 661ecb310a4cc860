"""evomerge: discover how to merge fine-tuned LLMs.

The package is in layers; each imports only from the ones below it (enforced
by import-linter, see ``pyproject.toml``; the map is ``docs/architecture.md``):

- ``engine/``: merge a recipe (sources, plans, the method registry, the
  in-place merger, routing, writing folders). Usable alone.
- ``search/``: the search space, mapping an optimizer's points to recipes.
- ``fitness/``: scoring a candidate (lm-eval, perplexity, custom objectives),
  paired statistics, the selection race, the default merges.
- ``run/``: one search over time (config, run folder and study, drivers,
  schedules, executors, the loop).
- ``app/``: the command line, status and export, the report, the demo.

``errors`` (the one exception type) and ``schema`` (the strict base of every
user-written schema) sit beside them and import nothing of the package.

Importing the package is cheap: heavy dependencies (torch, transformers,
lm-eval, optuna, cma, ray) are imported only by the modules that use them.
"""

from typing import Any

from evomerge.errors import EvomergeError

__version__ = "0.1.0"
__all__ = ["EvomergeError", "InPlaceMerger", "Recipe", "__version__", "load_recipe", "merge_to_disk"]


def __getattr__(name: str) -> Any:
    # The engine's entry points, loaded on first use (they import torch).
    if name in ("InPlaceMerger", "Recipe", "load_recipe", "merge_to_disk"):
        from evomerge import engine

        return getattr(engine, name)
    raise AttributeError(f"module 'evomerge' has no attribute {name!r}")
