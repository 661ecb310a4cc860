"""Scores into what a run records: the trial record and the values the
optimizer is told (with the failure penalty), the cache of scored recipes,
and the incumbent early stopping compares with."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

from evomerge.engine.recipe import Recipe
from evomerge.fitness.aggregate import Aggregate, signed_weights
from evomerge.fitness.estimate import Pool, Rungs
from evomerge.fitness.score import Score
from evomerge.run.record import TrialRecord
from evomerge.run.store import RunStore


@dataclass
class Outcome:
    """What one candidate scored, as the run records it."""

    values: list[float]  # what the optimizer is told
    record: TrialRecord  # what the trial stores


class Outcomes:
    """Turns workers' scores into trial outcomes, and caches them by recipe
    fingerprint (successes and non-finite failures: both are properties of
    the recipe). ``fitness`` and ``heldout``: the dev and held-out
    objectives' :class:`~evomerge.fitness.aggregate.Aggregate`, their
    weighted sums until the run sets its rules (once their expert references
    are known; None while they wait)."""

    def __init__(self, store: RunStore, objectives: list, heldout_objectives: list, pool: Pool | None = None):
        self.store, self.objectives = store, objectives
        self.fitness: Aggregate | None = Aggregate(signed_weights(objectives))
        self.heldout: Aggregate | None = Aggregate(signed_weights(heldout_objectives))
        self.cache: dict[str, Outcome] = {}
        # The best trial scored on every dev document, with per-document
        # scores: what early stopping compares a candidate with.
        self.incumbent: TrialRecord | None = None
        # Fidelity: every trial's per-document scores pooled (the prediction),
        # and the signed objective values of the complete ones (the front).
        self.pool = pool
        self.front: list[list[float]] = []
        self.weights = signed_weights(objectives)
        for record in store.trials(heldout=False):
            if record.fingerprint and (record.status == "ok" or record.non_finite):
                self.cache.setdefault(record.fingerprint, Outcome(record.told, record))
            self._consider(record)

    def _consider(self, record: TrialRecord) -> None:
        if record.complete and record.docs and (self.incumbent is None or record.fitness > self.incumbent.fitness):
            self.incumbent = record
        if self.pool is not None and record.ok and record.docs and not record.cached:
            self.pool.add(record.docs, record.positions)
        if record.complete and all(name in record.values for name in self.weights):
            self.front = with_point(
                self.front, [math.copysign(1.0, w) * record.values[n] for n, w in self.weights.items()]
            )

    def rungs(self, recipe: Recipe, settings, seed: int) -> Rungs:
        """How a candidate is scored with fidelity on (see :class:`Rungs`):
        the pool's prediction and the best complete trials to beat, the
        incumbent's fitness (or, for several optimised objectives, the
        Pareto front of their values)."""
        if len(self.store.directions) == 1:
            axes = [self.fitness]
            front = [[self.incumbent.fitness]] if self.incumbent is not None else []
        else:
            axes = [{name: math.copysign(1.0, w)} for name, w in self.weights.items()]
            front = self.front
        return Rungs(
            key=recipe.fingerprint(),
            seed=seed,
            predicted=self.pool.prediction() if self.pool is not None else {},
            axes=axes,
            front=front,
            fractions=tuple(settings.rungs),
            z=settings.z,
            min_docs=settings.min_docs,
        )

    def _values(self, score: Score) -> list[float]:
        if len(self.store.directions) == 1:
            return [self.fitness.value(score.values)]
        return [score.values[o.name] for o in self.objectives]

    def cached(self, recipe: Recipe, kind: str, name: str | None = None) -> Outcome | None:
        """A finished score of the same recipe, as a new trial's outcome (or None)."""
        hit = self.cache.get(recipe.fingerprint())
        if hit is None:
            return None
        source = hit.record
        keep = ("status", "reason", "non_finite", "values", "metrics", "fitness", "fitness_se", "se")
        keep += ("recipe", "fingerprint", "stopped")
        record = TrialRecord(kind=kind, name=name, cached=True, **{k: getattr(source, k) for k in keep})
        record.heldout_values, record.heldout_fitness = source.heldout_values, source.heldout_fitness
        record.heldout_docs = source.heldout_docs
        return Outcome(list(hit.values), record)

    def from_score(self, recipe: Recipe, kind: str, name: str | None, score: Score) -> Outcome:
        """A worker's score as what the optimizer is told and the trial stores:
        a failure (or a non-finite fitness) is told the penalty."""
        fingerprint = recipe.fingerprint()
        record = TrialRecord(
            kind=kind,
            name=name,
            fingerprint=fingerprint,
            recipe=recipe.model_dump(mode="json", exclude_none=True),
            status=score.status,
            reason=score.reason,
            non_finite=score.non_finite,
            values=score.values,
            metrics=score.metrics,
            seconds=score.seconds,
            merge_seconds=score.merge_seconds,
            eval_seconds=score.eval_seconds,
            attempts=score.attempts,
            docs=score.docs,
            documents=score.documents,
            stopped=score.stopped,
            se=score.se,
            positions=score.positions,
        )
        if score.se:
            record.fitness_se = self.fitness.se(score.values, score.se)
        if score.ok:
            values = self._values(score)
            record.fitness = self.fitness.value(score.values)
            if not all(math.isfinite(v) for v in values):
                record.status, record.reason, record.non_finite, record.fitness = (
                    "failed",
                    "non-finite fitness",
                    True,
                    None,
                )
        if record.status != "ok":
            record.status, record.reason = "failed", record.reason or "unknown"
            values = self.store.penalty()
        if score.heldout is not None:
            record = dataclasses.replace(record, **self.heldout_fields(score.heldout))
        outcome = Outcome(values, record)
        if record.status == "ok" or record.non_finite:
            self.cache[fingerprint] = outcome
        self._consider(record)
        return outcome

    def heldout_fields(self, score: Score) -> dict[str, Any]:
        """A held-out score as ``TrialRecord``'s ``heldout_*`` fields."""
        if not score.ok:
            return {"heldout_status": f"failed: {score.reason}"[:300]}
        fitness = self.heldout.value(score.values)
        return {
            "heldout_values": score.values,
            "heldout_fitness": fitness,
            "heldout_metrics": score.metrics,
            "heldout_docs": score.docs,
        }


def with_point(front: list[list[float]], point: list[float]) -> list[list[float]]:
    """A Pareto front (no point at least as good as another on every axis,
    higher is better) with ``point`` added."""
    if any(all(a >= b for a, b in zip(q, point, strict=True)) for q in front):
        return front
    return [q for q in front if not all(b >= a for a, b in zip(q, point, strict=True))] + [point]


def describe(record: TrialRecord) -> str:
    """A trial's score in a few characters, for the progress bar and log."""
    if record.status != "ok":
        return f"failed ({(record.reason or '?')[:40]})"
    return f"{record.fitness:.4f}" + (" (cached)" if record.cached else "")
