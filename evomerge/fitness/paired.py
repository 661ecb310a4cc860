"""Paired comparisons of candidates scored on the same documents.

A candidate's per-document scores are ``{objective: [value per document]}``,
each list in its evaluator's document order (see
:attr:`evomerge.fitness.evaluate.Evaluator.order`). An objective's value is the mean
of its documents, and the fitness by default the weighted sum of the
objectives, each weight signed by its direction (``signed_weights``), so
higher is better. Every function here takes those weights or an
:class:`~evomerge.fitness.aggregate.Aggregate` (normalized objectives, a min
or softmin), whose differences and errors come from its gradient.

Two candidates scored on the same documents differ in fitness by
``sum_o w_o * mean_d(a_od - b_od)``; its standard error is
``sqrt(sum_o w_o**2 * var_d(a_od - b_od) / n_o)``. Pairing removes what the
documents themselves contribute (an easy document is easy for both), so the
difference is far less noisy than the difference of two unpaired means.
The tests are normal approximations (z tests), fine from a few dozen
documents on.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from evomerge.fitness.aggregate import Aggregate, signed_weights

Docs = dict[str, list[float]]


@dataclass(frozen=True)
class Paired:
    """``a - b`` in fitness units, on the documents both were scored on."""

    diff: float
    se: float
    n: int  # documents compared, over all objectives

    @property
    def z(self) -> float:
        if self.se > 0:
            return self.diff / self.se
        return 0.0 if self.diff == 0 else math.copysign(math.inf, self.diff)

    @property
    def p_worse(self) -> float:
        """One-sided p-value of "a is not worse than b" (small: a is worse)."""
        return 0.5 * math.erfc(-self.z / math.sqrt(2))

    @property
    def p(self) -> float:
        """Two-sided p-value of "a and b are equal"."""
        return math.erfc(abs(self.z) / math.sqrt(2))


def _mean_var(xs: Sequence[float]) -> tuple[float, float]:
    n = len(xs)
    mean = sum(xs) / n
    var = sum((x - mean) ** 2 for x in xs) / (n - 1) if n > 1 else 0.0
    return mean, var


def paired(a: Docs, b: Docs, weights: dict[str, float] | Aggregate) -> Paired:
    """Compare ``a`` with ``b`` on the documents both have (each objective's
    common prefix)."""
    agg = Aggregate.of(weights)
    common = {}
    for name in agg.weights:
        n = min(len(a[name]), len(b[name]))
        if n == 0:
            raise ValueError(f"no common documents for {name}")
        common[name] = n
    total = sum(common.values())
    if agg.linear:
        diff = var = 0.0
        for name, w in agg.gradient().items():
            n = common[name]
            mean, v = _mean_var([x - y for x, y in zip(a[name][:n], b[name][:n])])
            diff += w * mean
            var += w * w * v / n
        return Paired(diff, math.sqrt(var), total)
    mine = {name: sum(a[name][:n]) / n for name, n in common.items()}
    theirs = {name: sum(b[name][:n]) / n for name, n in common.items()}
    ga, gb = agg.gradient(mine), agg.gradient(theirs)
    var = 0.0
    for name, n in common.items():
        _, v = _mean_var([ga[name] * x - gb[name] * y for x, y in zip(a[name][:n], b[name][:n])])
        var += v / n
    return Paired(agg.value(mine) - agg.value(theirs), math.sqrt(var), total)


def means(docs: Docs, names) -> dict[str, float]:
    """Each objective's mean over its documents."""
    return {name: sum(docs[name]) / len(docs[name]) for name in names}


def fitness(docs: Docs, weights: dict[str, float] | Aggregate) -> float:
    """The fitness of per-document scores: the aggregate of the objective means."""
    agg = Aggregate.of(weights)
    if agg.rule == "sum" and not agg.references:  # the weighted sum, exactly as always
        return sum(w * sum(docs[name]) / len(docs[name]) for name, w in agg.weights.items())
    return agg.value(means(docs, agg.names))


def standard_error(docs: Docs, weights: dict[str, float] | Aggregate) -> float:
    """The standard error of :func:`fitness` over the documents."""
    agg = Aggregate.of(weights)
    grad = agg.gradient(None if agg.linear else means(docs, agg.names))
    return math.sqrt(sum(w * w * _mean_var(docs[name])[1] / len(docs[name]) for name, w in grad.items()))


def prefix(docs: Docs, counts: dict[str, int]) -> Docs:
    """The first ``counts[name]`` documents of each objective."""
    return {name: values[: counts[name]] for name, values in docs.items()}


__all__ = ["Docs", "Paired", "fitness", "means", "paired", "prefix", "signed_weights", "standard_error"]
