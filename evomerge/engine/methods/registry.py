"""The registry: every merge method, collected from the module that declares
it beside its kernel, by name, in the order ``evomerge methods`` lists them."""

from __future__ import annotations

from evomerge.engine.methods import linear, sce, selective, slerp, task_arithmetic
from evomerge.engine.methods.base import MergeMethod
from evomerge.errors import EvomergeError

_DECLARED = (
    *task_arithmetic.METHODS,  # task_arithmetic, ties, dare_ties, dare_linear, breadcrumbs(_ties), della(_linear)
    linear.LINEAR,
    slerp.SLERP,
    slerp.NUSLERP,
    linear.MODEL_STOCK,
    linear.PASSTHROUGH,
    slerp.MULTISLERP,
    selective.NEARSWAP,
    slerp.KARCHER,
    sce.SCE,
    selective.ARCEE_FUSION,
    selective.RAM,
    selective.RAMPLUS_TL,
)
METHODS: dict[str, MergeMethod] = {method.name: method for method in _DECLARED}


def get_method(name: str) -> MergeMethod:
    """The method called ``name``; an EvomergeError naming the known ones otherwise."""
    try:
        return METHODS[name]
    except KeyError:
        raise EvomergeError(f"unknown merge method {name!r}; use one of: {', '.join(sorted(METHODS))}") from None
