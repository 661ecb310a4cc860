"""The genes of a search space: the numbers an optimizer searches, in two kinds.

``MergeGenes`` (:mod:`evomerge.search.merge_genes`) are the merge half (which method, and the values of its
searched parameters, per model, module group and depth); ``RouteGenes``
(:mod:`evomerge.search.route_genes`) are the routing half (which layer slots a route runs, or which model each
position of a fixed-depth path takes, and the scales of the steps). Both offer
one small interface: their ``genes``, the Optuna ``distributions`` of those
genes, ``suggest`` (define-by-run), ``unit_to_params``/``params_to_unit``
between the unit cube and named values, ``decode`` of named values into
their part of a recipe, and ``encode`` of that part back, which raises
:class:`NotInSpace` with the reason when the part cannot be expressed.
The parts of a space file the genes are built from (``SearchedParam``,
``RoutingSpec``, ``PathSpec``) are declared here with what both kinds
share (``Gene``, ``NotInSpace``), so the genes need nothing from
``evomerge.search.space``, which validates a whole space file and
composes the two kinds of genes into a ``SearchSpace``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from pydantic import field_validator

from evomerge.engine.methods import MergeMethod
from evomerge.errors import EvomergeError
from evomerge.schema import Strict

DIGITS = 6
METHOD_GENE = "method"


class SearchedParam(Strict):
    """How one parameter is searched: its granularity, module groups and narrowed bounds."""

    per: Literal["global", "layer", "block", "gradient"] = "global"
    block: int | None = None
    points: int | None = None
    groups: list[str] | None = None
    bounds: tuple[float, float] | None = None

    @field_validator("block", "points")
    @classmethod
    def _positive(cls, v):
        if v is not None and v < 1:
            raise ValueError("must be at least 1")
        return v


class PathSpec(Strict):
    """The constrained routing variant: a path of fixed ``depth`` whose
    position k runs layer k (scaled to each model's depth) of a chosen model."""

    depth: int | None = None  # default: the first routing source's depth

    @field_validator("depth")
    @classmethod
    def _positive(cls, v):
        if v is not None and v < 1:
            raise ValueError("must be at least 1")
        return v


class RoutingSpec(Strict):
    """Layer routing (the data-flow space of Akiba et al., 2024).

    The layers of the ``sources`` (M models; default: the config's models,
    after ``merge`` in a hybrid), repeated ``repeats`` times, are T slots in
    order; each slot is included or skipped. ``scale`` multiplies each
    included layer's input: one value per slot, one per transition between
    models (the paper's M x M matrix; the first step is not scaled), or
    none. ``first``/``last: forced`` always include the first and the last
    slot, so that a route starts with the first source's first layer and ends
    with the last source's last layer. ``path`` replaces the slots by the
    constrained variant.
    """

    sources: list[str] | None = None
    repeats: int = 3
    scale: Literal["per_slot", "per_transition", "none"] = "per_transition"
    scale_bounds: tuple[float, float] = (0.5, 1.5)
    min_depth: int = 1
    max_depth: int | None = None
    first: Literal["forced", "free"] = "free"
    last: Literal["forced", "free"] = "free"
    path: PathSpec | None = None

    @field_validator("repeats", "min_depth")
    @classmethod
    def _at_least_one(cls, v):
        if v < 1:
            raise ValueError("must be at least 1")
        return v


class NotInSpace(EvomergeError):
    """A recipe this space cannot express exactly; the message says why."""


@dataclass(frozen=True)
class Gene:
    """One searched number: its Optuna name, bounds, and where it lands."""

    name: str
    low: float
    high: float
    param: str = ""
    method: str | None = None  # only used when this method is chosen
    model: str | None = None  # per-model parameters: the model's path
    group: str | None = None  # module-group filter, "" for the rest
    index: int = 0  # position along the depth
    kind: str = "float"  # or "bool" (route slots) or "choice" (route path picks)
    choices: tuple = ()

    def from_unit(self, unit: float) -> float:
        """The value at ``unit`` (in [0, 1]) of this gene's range, rounded to ``DIGITS``."""
        return round(self.low + unit * (self.high - self.low), DIGITS)

    def to_unit(self, value: Any) -> float:
        """Where ``value`` lies in this gene's range, as a unit-cube coordinate."""
        return (float(value) - self.low) / (self.high - self.low)


def equal_bin(unit: float, count: int) -> int:
    """Which of ``count`` equal bins of [0, 1] holds ``unit`` (1.0 in the last)."""
    return min(count - 1, int(unit * count))


def bin_centre(index: int, count: int) -> float:
    """The centre of bin ``index`` of ``count`` equal bins of [0, 1]."""
    return (index + 0.5) / count


def value_in(params: dict[str, Any], gene: Gene) -> Any:
    """The named value of ``gene`` in a point; a point without it is from another space."""
    if gene.name not in params:
        raise EvomergeError(f"point lacks {gene.name!r}; it does not belong to this space")
    return params[gene.name]


def short_names(refs: list[str]) -> dict[str, str]:
    """Readable, unique labels for model paths (their last path part)."""
    out: dict[str, str] = {}
    for i, ref in enumerate(refs):
        label = Path(ref).name or ref
        out[ref] = label if label not in out.values() else f"{label}#{i}"
    return out


def check_param_names(methods: list[MergeMethod], search: dict, fixed: dict, where: str) -> None:
    """Refuse parameters no listed method declares, and ones both searched and fixed."""
    names = {name for method in methods for name in method.param_names}
    for group in (search, fixed):
        for name in group:
            if name not in names:
                raise EvomergeError(
                    f"{where}: no method in {[method.name for method in methods]} has a parameter {name!r}; "
                    f"use one of {', '.join(sorted(names))}"
                )
    both = set(search) & set(fixed)
    if both:
        raise EvomergeError(f"{where}: {sorted(both)[0]!r} is both searched and fixed; keep one")


def in_words(n: int) -> str:
    """A small count in words, for messages ("two models")."""
    return {1: "one", 2: "two", 3: "three"}.get(n, str(n))


def number(value: Any, what: str) -> float:
    """``value`` as a float; a recipe's value that is no number is not in the space."""
    try:
        return float(value)
    except (TypeError, ValueError):
        raise NotInSpace(f"{what} is {value!r}, not a number") from None


__all__ = [
    "DIGITS",
    "METHOD_GENE",
    "Gene",
    "NotInSpace",
    "PathSpec",
    "RoutingSpec",
    "SearchedParam",
    "bin_centre",
    "check_param_names",
    "equal_bin",
    "in_words",
    "number",
    "short_names",
    "value_in",
]
