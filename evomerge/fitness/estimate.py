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
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np


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


def combine(estimates: dict[str, Estimate], weights: dict[str, float]) -> Estimate:
    """The weighted sum of independent objectives' estimates (each objective
    is its own stratum, drawn on its own)."""
    value = sum(weights[name] * e.value for name, e in estimates.items())
    se = math.sqrt(sum((weights[name] * e.se) ** 2 for name, e in estimates.items()))
    scored = sum(e.scored for e in estimates.values())
    total = sum(e.total for e in estimates.values())
    return Estimate(value, se, scored, total)


__all__ = ["Estimate", "combine", "difference", "draw", "plain_mean", "prediction"]
