"""The trial record: one scored candidate as the run stores it, the one typed
shape every driver, the loop, ``status``, ``export`` and ``report`` read
(:mod:`evomerge.run.store` turns it into Optuna trial attributes and back),
and the rules that pick the run's best from a list of them."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

# Attribute names of the stored form. Older runs were written with the same
# names, minus ``non_finite`` (read from the reason for them).
_SCALARS = (
    "kind",
    "name",
    "fingerprint",
    "recipe",
    "status",
    "reason",
    "values",
    "metrics",
    "fitness",
    "seconds",
    "merge_seconds",
    "eval_seconds",
    "docs",
    "documents",
    "se",
    "fitness_se",
    "positions",
)
_HELDOUT = {
    "heldout": "heldout_values",
    "heldout_fitness": "heldout_fitness",
    "heldout_metrics": "heldout_metrics",
    "heldout_docs": "heldout_docs",
}
_KNOWN = {*_SCALARS, *_HELDOUT, "heldout_status", "attempts", "cached", "non_finite", "stopped"}


def compact(docs: dict[str, list[float]] | None) -> dict[str, list[float]] | None:
    """Per-document scores as stored: whole numbers as ints (accuracy is 0
    or 1), others to 6 significant digits."""
    if docs is None:
        return None
    return {k: [int(v) if float(v).is_integer() else float(f"{v:.6g}") for v in vs] for k, vs in docs.items()}


@dataclass
class TrialRecord:
    """One scored candidate (a search trial or a baseline), as the run stores it."""

    kind: str  # "search" or "baseline"
    status: str = "ok"  # "ok", "failed", or "interrupted" (Ctrl-C while it was scored)
    reason: str | None = None  # why it failed
    non_finite: bool = False  # failed for NaN or inf weights, metrics or fitness: a real, cacheable result
    fitness: float | None = None  # the objectives aggregated by the fitness rule, higher is better (successful trials)
    values: dict[str, float] = field(default_factory=dict)  # raw value per objective name
    metrics: dict[str, float] = field(default_factory=dict)  # every number the evaluation produced
    recipe: dict[str, Any] | None = None
    fingerprint: str | None = None  # the recipe's
    name: str | None = None  # a baseline's name
    cached: bool = False  # a duplicate recipe: the earlier trial's score, nothing merged or evaluated
    seconds: float = 0.0
    merge_seconds: float = 0.0
    eval_seconds: float = 0.0
    attempts: int = 1  # workers that tried it (a Ray worker may die mid-candidate)
    docs: dict[str, list[float]] | None = None  # per-document dev scores (evomerge.fitness.paired)
    documents: int | None = None  # dev documents scored
    stopped: bool = False  # stopped early (worse than the incumbent, or by fidelity): values and fitness estimated
    se: dict[str, float] | None = None  # a stopped trial's standard error per objective value
    fitness_se: float | None = None  # and of its fitness
    positions: dict[str, list[int]] | None = None  # fidelity: per task, the positions of ``docs`` (else a prefix)
    heldout_values: dict[str, float] | None = None
    heldout_fitness: float | None = None
    heldout_metrics: dict[str, float] | None = None
    heldout_docs: dict[str, list[float]] | None = None
    heldout_status: str | None = None  # "failed: REASON" when the held-out scoring failed
    extra: dict[str, Any] = field(default_factory=dict)  # a driver's own keys (CMA-ES generation, index)
    # Filled in when read back from the study:
    number: int | None = None
    told: list[float] | None = None  # what the optimizer was told (the Optuna trial's values)
    params: dict[str, Any] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        """Scored successfully (it has a fitness)."""
        return self.status == "ok" and self.fitness is not None

    @property
    def complete(self) -> bool:
        """Scored successfully on every dev document (not stopped early)."""
        return self.ok and not self.stopped

    def heldout_attrs(self) -> dict[str, Any]:
        """The held-out part of the stored form."""
        if self.heldout_status is not None:
            return {"heldout_status": self.heldout_status}
        if self.heldout_values is None:
            return {}
        out = {key: getattr(self, name) for key, name in _HELDOUT.items() if getattr(self, name) is not None}
        if "heldout_docs" in out:
            out["heldout_docs"] = compact(out["heldout_docs"])
        return out

    def to_attrs(self) -> dict[str, Any]:
        """The stored form: Optuna user attributes (JSON values)."""
        out = {k: getattr(self, k) for k in _SCALARS if getattr(self, k) is not None}
        if self.status == "ok":
            out.pop("reason", None)
        if self.attempts > 1:
            out["attempts"] = self.attempts
        if self.cached:
            out["cached"] = True
        if self.non_finite:
            out["non_finite"] = True
        if self.stopped:
            out["stopped"] = True
        if "docs" in out:
            out["docs"] = compact(out["docs"])
        return {**out, **self.heldout_attrs(), **self.extra}

    @classmethod
    def from_attrs(cls, attrs: dict[str, Any], **read: Any) -> TrialRecord:
        """Read the stored form (``read``: number, told, params from the trial)."""
        record = cls(kind=attrs.get("kind", "search"), **read)
        for k in _SCALARS:
            if k in attrs:
                setattr(record, k, attrs[k])
        record.attempts = int(attrs.get("attempts", 1))
        record.cached = bool(attrs.get("cached", False))
        record.non_finite = bool(attrs.get("non_finite", (record.reason or "").startswith("non-finite")))
        record.stopped = bool(attrs.get("stopped", False))
        record.extra = {k: v for k, v in attrs.items() if k not in _KNOWN}
        return with_heldout(record, attrs)


def with_heldout(record: TrialRecord, attrs: dict[str, Any]) -> TrialRecord:
    """``record`` with the held-out part of stored attributes ``attrs``."""
    fields = {name: attrs[key] for key, name in _HELDOUT.items() if key in attrs}
    if "heldout_status" in attrs:
        fields["heldout_status"] = attrs["heldout_status"]
    return dataclasses.replace(record, **fields) if fields else record


def rank_key(record: TrialRecord) -> tuple[float, int]:
    """Sort key: highest fitness first, then the earliest trial."""
    return (-record.fitness, record.number if record.number is not None else 0)


def best_of(records: list[TrialRecord]) -> TrialRecord | None:
    """The complete record (scored on every dev document) with the highest
    fitness, the earliest among equals; None when none succeeded."""
    return min((r for r in records if r.complete), key=rank_key, default=None)


def chosen(records: list[TrialRecord], race: dict | None) -> tuple[TrialRecord | None, str]:
    """The run's exported best and the rule that chose it: the selection
    race's winner (``race``, :meth:`RunStore.race`), or the best dev fitness."""
    if race and race.get("winner") is not None:
        winner = next((r for r in records if r.number == race["winner"]), None)
        if winner is not None:
            return winner, "race"
    return best_of(records), "dev"


def judged(records: list[TrialRecord], race: dict | None, weights: dict[str, float]):
    """The held-out :class:`~evomerge.fitness.race.Verdict` of the run's chosen
    best (see :func:`chosen`) against its best default merge; None without
    either."""
    from evomerge.fitness.baselines import is_source
    from evomerge.fitness.race import verdict

    winner, rule = chosen(records, race)
    default = best_of([r for r in records if r.kind == "baseline" and not is_source(r.name)])
    return verdict(winner, rule, default, weights)


__all__ = ["TrialRecord", "best_of", "chosen", "compact", "judged", "rank_key", "with_heldout"]
