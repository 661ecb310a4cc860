"""The result of scoring a candidate (``Score``), and how scoring may stop
early against an incumbent (``Versus``)."""

from __future__ import annotations

import numbers
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from evomerge.fitness.aggregate import Aggregate, signed_weights
from evomerge.fitness.paired import Docs

if TYPE_CHECKING:
    from evomerge.fitness.spec import ObjectiveSpec


@dataclass
class Score:
    """The result of scoring one candidate.

    ``values`` holds one raw value per objective (in its own direction; NaN
    where it could not be computed); ``metrics`` every number the evaluation
    produced, keyed ``task/metric``. ``eval_seconds`` is the time spent in
    forward passes (lm-eval's ``evaluate``, perplexity, custom callables).
    From :meth:`Evaluator.score`, ``seconds`` is the evaluation alone (so
    ``seconds - eval_seconds`` is the scorer's own overhead); from a worker,
    it also counts ``merge_seconds`` (merging in place, or building the
    route). ``non_finite`` marks a failure for NaN or inf weights or
    metrics: a property of the recipe, not an accident, so it is cached like
    a success. ``attempts`` counts the workers that tried the candidate (more
    than one when a worker died under it); ``heldout`` is the held-out score
    when a worker was asked for both.

    ``docs`` holds the per-document scores (``{objective: [value per
    document]}``, in the evaluator's document order, for the documents
    scored) when every objective has them (lm-eval tasks whose metric is a
    mean); ``documents`` counts the lm-eval documents scored. ``stopped``:
    scoring stopped early, the candidate being clearly worse than the
    incumbent it was scored against (:class:`Versus`), or beaten by the
    search's best at one of its rungs (:class:`~evomerge.fitness.estimate.Rungs`);
    its ``values`` are then estimates of the full-dev values, and ``se``
    holds each one's standard error. ``positions``: for a candidate stopped
    by its rungs, each task's scored positions (in the evaluator's order),
    in the order of ``docs``; otherwise ``docs`` cover a prefix of that
    order (every document for a complete candidate).
    """

    values: dict[str, float]
    metrics: dict[str, float]
    status: str = "ok"
    reason: str | None = None
    non_finite: bool = False
    seconds: float = 0.0
    eval_seconds: float = 0.0
    merge_seconds: float = 0.0
    attempts: int = 1
    heldout: Score | None = None
    docs: Docs | None = None
    documents: int = 0
    stopped: bool = False
    se: dict[str, float] | None = None
    positions: dict[str, list[int]] | None = None

    @classmethod
    def failed(cls, reason: str, seconds: float = 0.0) -> Score:
        """A failed score; the reason is cut to its first line, 500 characters at most."""
        return cls(
            values={},
            metrics={},
            status="failed",
            reason=reason.splitlines()[0][:500] if reason else "unknown",
            seconds=seconds,
        )

    @property
    def ok(self) -> bool:
        return self.status == "ok"

    def fitness(self, objectives: Sequence[ObjectiveSpec]) -> float:
        """Weighted sum of the objective values, higher is better (minimised
        objectives count negatively). Undefined for a failed score."""
        if self.status != "ok":
            raise ValueError(f"a failed score has no fitness ({self.reason}); apply the search's failure penalty")
        return Aggregate(signed_weights(objectives)).value(self.values)


@dataclass(frozen=True)
class Versus:
    """Early stopping: score a candidate's documents in steps and stop as soon
    as it is significantly worse than the incumbent on the documents scored
    so far.

    ``docs`` are the incumbent's per-document scores on every document. The
    steps end at the fractions ``looks`` of each task's documents (a look
    that would compare fewer than ``min_docs`` documents of a task is
    skipped), then at all of them. After each step but the last, a one-sided
    paired test (:func:`evomerge.fitness.paired.paired`) of candidate against
    incumbent on the same documents stops the candidate when its p-value is
    below ``alpha``.

    A stopped candidate's value per objective is the paired estimate of what
    the full documents would have given: the incumbent's full mean plus the
    candidate's difference to the incumbent on the documents scored. It
    keeps the difference measured (the information the test used), and the
    documents' own difficulty cancels, so stopped and complete candidates
    rank on one scale, as the drivers need.

    The incumbent's own recipe, scored against itself, never stops: its
    differences are all zero. ``aggregate``: the run's fitness rule (its
    normalized objectives and min or softmin), which the paired test
    compares on; None for the weighted sum of the objectives.
    """

    docs: Docs
    alpha: float = 0.05
    looks: tuple[float, ...] = (0.125, 0.25, 0.5)
    min_docs: int = 16
    aggregate: Aggregate | None = None  # the run's fitness rule; None: the weighted sum


def is_number(value: Any) -> bool:
    """Whether ``value`` is a real number a score can hold (not a bool)."""
    return isinstance(value, numbers.Real) and not isinstance(value, bool)  # numpy scalars included


__all__ = ["Score", "Versus", "is_number"]
