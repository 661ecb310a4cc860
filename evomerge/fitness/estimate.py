"""Cheap fitness: a candidate's full-dev score estimated from a subset of its
documents, with an unbiased difference estimator and its standard error.

A candidate is scored on a simple random sample S of n of the N documents of
an objective. A per-document prediction f, fixed before S is drawn, predicts
its score on every document, and the residuals it sees correct it:

    estimate = mean over all N of f + mean over S of (y - f)
    SE = sqrt((1 - n/N) * var over S of (y - f) / n)

For any such f that is exactly unbiased, however poor f is (a control
variate; with f = 0 it is the plain subset mean), and given every document
it is the full score with SE 0. The better f predicts y, the smaller the
error. The prediction (:func:`prediction`) pools what the run has scored
on each document before the candidate: the baselines (sources and default
merges, scored on every dev document before the search starts) and the
search's earlier candidates. Measured on the stored SmolLM2 searches
(``benchmarks/fitness_estimate.py``), that halves the subset mean's error at
an eighth of the documents, where a regression on the references fitted on
the candidate's own documents (cross-fitted, to stay unbiased) gained a
fifth.

:func:`draw` gives each candidate its own order of the documents from the
run seed, so that candidates are not all fitted to the same few documents;
a fidelity f scores its first ceil(f * N), and a promoted candidate extends
the same subset.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

from evomerge.fitness.aggregate import Aggregate


@dataclass(frozen=True)
class Estimate:
    """An objective's estimated full-dev score from ``scored`` of ``total`` documents."""

    value: float
    se: float
    scored: int
    total: int


def draw(seed: int, key: str | int, objective: str, total: int) -> list[int]:
    """A permutation of an objective's ``total`` document positions, drawn
    from the run ``seed`` and the candidate's ``key`` (its trial number):
    the same for the same candidate, another for each candidate."""
    digest = hashlib.sha256(f"{seed}/{key}/{objective}".encode()).digest()
    rng = np.random.default_rng(int.from_bytes(digest[:8], "little"))
    return rng.permutation(total).tolist()


def plain_mean(y: Sequence[float], total: int) -> Estimate:
    """The subset mean and its standard error (the estimator to beat): the
    difference estimate with no prediction."""
    return difference(range(len(y)), y, np.zeros(total))


def difference(scored: Sequence[int], y: Sequence[float], predicted: Sequence[float]) -> Estimate:
    """The difference estimate of the mean of y over every document.

    ``scored``: the positions (0..N-1) of the scored documents, a random
    sample without replacement; ``y``: the candidate's per-document scores
    there; ``predicted``: the prediction f on every document, made before
    the sample was drawn (see :func:`prediction`).
    """
    f = np.asarray(predicted, dtype=float)
    total = len(f)
    idx = np.asarray(scored, dtype=int)
    y = np.asarray(y, dtype=float)
    n = len(idx)
    if n != len(y):
        raise ValueError(f"{n} documents scored but {len(y)} scores")
    if n == 0:
        return Estimate(math.nan, math.inf, 0, total)
    residual = y - f[idx]
    se = math.sqrt(max(0.0, 1 - n / total) * _var(residual) / n) if n > 1 else math.inf
    return Estimate(float(f.mean() + residual.mean()), se if n < total else 0.0, n, total)


def prediction(references: np.ndarray, earlier: Sequence[dict[int, float]] = ()) -> np.ndarray:
    """Per document, the mean score of everything scored on it before: the
    references (``(models, N)``, every document) and the earlier candidates
    (``{position: score}`` for the documents each scored)."""
    refs = np.atleast_2d(np.asarray(references, dtype=float))
    sums, counts = refs.sum(axis=0), np.full(refs.shape[1], float(refs.shape[0]))
    for scores in earlier:
        for position, value in scores.items():
            sums[position] += value
            counts[position] += 1
    return sums / np.maximum(counts, 1)


def _var(x: np.ndarray) -> float:
    return float(x.var(ddof=1)) if len(x) > 1 else math.inf


def combine(estimates: dict[str, Estimate], weights: Mapping[str, float] | Aggregate) -> Estimate:
    """The fitness of independent objectives' estimates (each objective is
    its own stratum, drawn on its own): their weighted sum, or another
    aggregate, with its delta-method standard error
    (:meth:`~evomerge.fitness.aggregate.Aggregate.se`)."""
    agg = Aggregate.of(weights)
    values = {name: e.value for name, e in estimates.items()}
    value = agg.value(values)
    se = agg.se(values, {name: e.se for name, e in estimates.items()})
    scored = sum(e.scored for e in estimates.values())
    total = sum(e.total for e in estimates.values())
    return Estimate(value, se, scored, total)


class Pool:
    """The running per-document prediction of a search (:func:`prediction`,
    kept up to date): for each objective, the sum and count of every score
    recorded on each of its ``totals[objective]`` documents.

    ``add`` takes a trial's per-document scores; ``positions`` (task ->
    document positions, in the order of its scores) for a trial scored on
    its own subset, or None for one scored on a prefix of the evaluator's
    order (every document, or stopped early against the incumbent).
    """

    def __init__(self, totals: Mapping[str, int], doc_tasks: Mapping[str, str]):
        self.doc_tasks = dict(doc_tasks)
        self._sums = {name: np.zeros(n) for name, n in totals.items()}
        self._counts = {name: np.zeros(n) for name, n in totals.items()}

    def add(self, docs: Mapping[str, Sequence[float]], positions: Mapping[str, Sequence[int]] | None = None) -> None:
        for name, values in docs.items():
            if name not in self._sums or not values:
                continue
            where = positions[self.doc_tasks[name]] if positions is not None else range(len(values))
            if len(where) != len(values) or len(values) > len(self._sums[name]):
                continue  # scored on other documents (a config changed since): not this pool's
            idx = np.asarray(where, dtype=int)
            np.add.at(self._sums[name], idx, np.asarray(values, dtype=float))
            np.add.at(self._counts[name], idx, 1.0)

    def prediction(self) -> dict[str, list[float]]:
        """Per objective, the mean score recorded on each document (0 where none)."""
        return {name: (s / np.maximum(self._counts[name], 1.0)).tolist() for name, s in self._sums.items()}


@dataclass(frozen=True)
class Rungs:
    """Multi-fidelity scoring of one candidate (``fidelity:`` in the config).

    The candidate's documents are its own permutation of each task's
    documents (:func:`draw`, from ``seed`` and ``key``, its recipe's
    fingerprint: a candidate scored again after a crash gets the same one).
    They are scored in steps ending at the ``fractions`` of each task's
    documents (a step that would leave a task fewer than ``min_docs`` is
    skipped), then at all of them. After each step but the last, every
    objective is estimated with :func:`difference` from ``predicted`` (the
    search's :class:`Pool` when the candidate was submitted), and the
    candidate stops when a point of ``front`` beats it on every axis by
    more than ``z`` standard errors.

    ``axes``: what is compared, each an
    :class:`~evomerge.fitness.aggregate.Aggregate` of objectives (or their
    signed weights; higher is better): one axis, the fitness, for a
    single-fitness search; one per objective for several (NSGA-II). ``front``: the values on those
    axes of the best fully scored trials (the incumbent alone, or the
    Pareto front). Without a front, nothing can stop it.
    """

    key: str
    seed: int
    predicted: dict[str, list[float]]
    axes: list[Aggregate | dict[str, float]]
    front: list[list[float]] = field(default_factory=list)
    fractions: tuple[float, ...] = (0.125, 0.25, 0.5)
    z: float = 1.0
    min_docs: int = 16

    def order(self, task: str, total: int) -> list[int]:
        """The candidate's scoring order of a task's ``total`` positions."""
        return draw(self.seed, self.key, task, total)

    def ends(self, totals: Mapping[str, int]) -> list[dict[str, int]]:
        """Per step, how many of each task's documents are scored by its end."""
        out = []
        for f in sorted(self.fractions):
            end = {t: math.ceil(f * n) for t, n in totals.items()}
            if all(self.min_docs <= e < n for e, n in zip(end.values(), totals.values(), strict=True)):
                if not out or out[-1] != end:
                    out.append(end)
        return [*out, dict(totals)]

    def estimates(self, docs: Mapping[str, Sequence[float]], orders: Mapping[str, Sequence[int]], tasks) -> dict:
        """Each objective's :class:`Estimate` from its scores so far."""
        return {
            name: difference(orders[tasks[name]][: len(y)], y, self.predicted[name])
            for name, y in docs.items()
            if name in self.predicted
        }

    def beaten(self, estimates: Mapping[str, Estimate]) -> bool:
        """Whether a point of the front beats these estimates by more than
        ``z`` standard errors on every axis."""
        on_axes = [combine({n: estimates[n] for n in Aggregate.of(axis).names}, axis) for axis in self.axes]
        return any(
            all(p > e.value + self.z * e.se for p, e in zip(point, on_axes, strict=True)) for point in self.front
        )


__all__ = ["Estimate", "Pool", "Rungs", "combine", "difference", "draw", "plain_mean", "prediction"]
