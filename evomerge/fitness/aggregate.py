"""How a candidate's objective values become its one fitness (``fitness:``
and each objective's ``normalize`` in the config).

Each objective ``n`` gives a *term*: its value, signed by its direction and
multiplied by its weight, divided by its reference when it is normalized
(``normalize: expert``: the best source's value on it, so the term is the
share of that skill the candidate keeps; or a given number):

    t_n = w_n * v_n / r_n        (w_n negative for a minimised objective)

The fitness aggregates the terms (higher is better):

- ``sum`` (the default): sum_n t_n, the weighted sum;
- ``mean``: sum_n t_n / sum_n |w_n|, the weighted mean;
- ``min``: min_n t_n, the worst-kept skill;
- ``softmin``: -T log sum_n exp(-t_n / T), a smooth lower bound of the min
  (at most T log(objectives) below it; ``temperature`` T, in term units).

Standard errors and paired differences of an aggregate come from its
gradient at the point (the delta method): each objective's mean counts with
the weight d fitness / d v_n, a constant w_n / r_n for ``sum`` (so every
result is the one the weighted sum always gave), one-hot on the worst term
for ``min`` (the error bar of the objective that is the minimum, treating
which one it is as known; near a tie it is too narrow), and the softmax of
-t / T for ``softmin``. A paired difference of two candidates under a
non-linear aggregate takes each candidate's own gradient, document by
document: ``mean_d(g_a * a_d - g_b * b_d)`` per objective.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

RULES = ("sum", "mean", "min", "softmin")


def signed_weights(objectives: Sequence) -> dict[str, float]:
    """Objective name -> weight, negative for a minimised objective."""
    return {o.name: o.weight * (1.0 if o.direction == "maximize" else -1.0) for o in objectives}


@dataclass(frozen=True)
class Aggregate:
    """The fitness of objective values (see the module's docstring).

    ``weights``: objective name -> signed weight
    (:func:`evomerge.fitness.paired.signed_weights`), in the objectives'
    order; ``references``: objective name -> the divisor of a normalized
    objective (positive); ``rule``: one of :data:`RULES`."""

    weights: Mapping[str, float]
    references: Mapping[str, float] = field(default_factory=dict)
    rule: str = "sum"
    temperature: float = 0.05

    def __post_init__(self):
        if self.rule not in RULES:
            raise ValueError(f"unknown aggregate {self.rule!r}; use one of {', '.join(RULES)}")

    @classmethod
    def of(cls, weights: Mapping[str, float] | Aggregate) -> Aggregate:
        """``weights`` as an aggregate: signed weights are their weighted sum."""
        return weights if isinstance(weights, Aggregate) else cls(dict(weights))

    @classmethod
    def of_objectives(
        cls,
        objectives: Sequence,
        rule: str = "sum",
        temperature: float = 0.05,
        experts: Mapping[str, float] | None = None,
    ) -> Aggregate:
        """The fitness of config objectives (``ObjectiveSpec``): their signed
        weights, each ``normalize`` (a number, or for ``expert`` the best
        source's value, from ``experts``), the ``fitness:`` rule."""
        references = {}
        for o in objectives:
            if o.normalize == "expert":
                if o.name not in (experts or {}):
                    raise ValueError(f"objective {o.name} has no expert reference yet: score the sources first")
                references[o.name] = experts[o.name]
            elif o.normalize is not None:
                references[o.name] = float(o.normalize)
        return cls(signed_weights(objectives), references, rule, temperature)

    @property
    def names(self) -> list[str]:
        return list(self.weights)

    @property
    def linear(self) -> bool:
        """Whether the fitness is a fixed linear combination of the values."""
        return self.rule in ("sum", "mean")

    def scale(self, name: str) -> float:
        """d term / d value of an objective."""
        w = self.weights[name]
        return w / self.references[name] if name in self.references else w

    def terms(self, values: Mapping[str, float]) -> dict[str, float]:
        """Each objective's term (signed, weighted, normalized)."""
        out = {}
        for name, w in self.weights.items():
            term = w * values[name]
            out[name] = term / self.references[name] if name in self.references else term
        return out

    def value(self, values: Mapping[str, float]) -> float:
        """The fitness of objective values (a mapping holding every objective)."""
        terms = list(self.terms(values).values())
        if self.rule == "sum":
            return sum(terms)
        if self.rule == "mean":
            return sum(terms) / sum(abs(w) for w in self.weights.values())
        if any(math.isnan(t) for t in terms):
            return math.nan
        low = min(terms)
        if self.rule == "min" or math.isinf(low):
            return low
        t = self.temperature
        return low - t * math.log(sum(math.exp(-(x - low) / t) for x in terms))

    def gradient(self, values: Mapping[str, float] | None = None) -> dict[str, float]:
        """d fitness / d value of each objective at ``values`` (for a linear
        aggregate the same everywhere, and ``values`` may be None)."""
        if self.rule == "sum":
            return {name: self.scale(name) for name in self.weights}
        if self.rule == "mean":
            total = sum(abs(w) for w in self.weights.values())
            return {name: self.scale(name) / total for name in self.weights}
        if values is None:
            raise ValueError(f"the gradient of aggregate {self.rule} depends on the values; give them")
        terms = self.terms(values)
        low = min(terms.values())
        if self.rule == "min" or not math.isfinite(low):
            first = next(name for name, x in terms.items() if x == low)
            return {name: self.scale(name) if name == first else 0.0 for name in terms}
        soft = {name: math.exp(-(x - low) / self.temperature) for name, x in terms.items()}
        total = sum(soft.values())
        return {name: self.scale(name) * s / total for name, s in soft.items()}

    def se(self, values: Mapping[str, float], ses: Mapping[str, float]) -> float:
        """The standard error of :meth:`value` from independent objectives'
        standard errors (the delta method)."""
        grad = self.gradient(values)
        return math.sqrt(sum((grad[name] * ses[name]) ** 2 for name in self.weights if name in ses))

    def retention(self, values: Mapping[str, float]) -> dict[str, float]:
        """Per normalized objective, the share of its reference kept: value
        over reference, or reference over value for a minimised one (1 is
        as good as the reference; for ``normalize: expert``, the best
        source). With other references: ``replace(rule, references=...)``."""
        return {
            name: kept(values[name], r, self.weights[name] < 0) for name, r in self.references.items() if name in values
        }


def kept(value: float, reference: float, minimised: bool = False) -> float:
    """The share of ``reference`` a ``value`` keeps (see :meth:`Aggregate.retention`)."""
    if minimised:
        return reference / value if value else math.inf
    return value / reference


__all__ = ["RULES", "Aggregate", "kept", "signed_weights"]
