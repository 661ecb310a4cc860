"""Custom objectives: a user's function ``(model, tokenizer) -> dict``, named
``module:function`` and imported from next to the config."""

from __future__ import annotations

import importlib
import sys
from collections.abc import Callable
from pathlib import Path

from evomerge.errors import EvomergeError, first_line
from evomerge.fitness.score import is_number


def import_callable(ref: str, root: Path) -> Callable:
    module_name, _, attr = ref.partition(":")
    # A module file next to the config is importable while we import it.
    added = str(root) not in sys.path
    if added:
        sys.path.insert(0, str(root))
    try:
        module = importlib.import_module(module_name)
    except Exception as e:  # noqa: BLE001 - the user's module may fail in any way
        raise EvomergeError(
            f"cannot import custom objective module {module_name!r} ({type(e).__name__}: {first_line(e)}); "
            f"install it or put {module_name.replace('.', '/')}.py in {root}"
        ) from None
    finally:
        if added:
            sys.path.remove(str(root))
    fn = getattr(module, attr, None)
    if not callable(fn):
        raise EvomergeError(f"module {module_name!r} has no function {attr!r}; fix the custom objective {ref!r}")
    return fn


def custom_values(ref: str, metric: str, function: Callable, model, tokenizer) -> tuple[float, dict[str, float]]:
    """The objective's value (``metric`` of what ``function`` returns) and
    every number it returned, as metrics."""
    out = function(model, tokenizer)
    if not isinstance(out, dict) or metric not in out:
        keys = ", ".join(map(str, out)) if isinstance(out, dict) else type(out).__name__
        raise RuntimeError(f"custom objective {ref} returned no {metric!r} (got {keys})")
    return float(out[metric]), {f"custom:{ref}/{k}": float(v) for k, v in out.items() if is_number(v)}


__all__ = ["custom_values", "import_callable"]
