"""A run's Pareto front over its dev objectives, the share of each skill its
points keep, and the rules that pick one of them to export
(``evomerge export --pick``):

- ``max-min``: the point whose worst-kept objective keeps the most, each
  objective as a share of its reference (its ``normalize`` reference, or
  else the best source's dev score on it): the model that keeps every skill
  best;
- ``weighted``: the point with the highest weighted sum of the objectives
  (normalized ones divided by their references), the default ranking of a
  weighted-sum search.

The front is taken over the trials scored on every dev document (search
trials and baselines; a trial stopped early has estimates, not scores),
each objective signed by its direction. Ties go to the lower trial number.
"""

from __future__ import annotations

import dataclasses

from evomerge.errors import EvomergeError
from evomerge.fitness.aggregate import Aggregate
from evomerge.fitness.baselines import is_source
from evomerge.run.record import TrialRecord

PICKS = ("max-min", "weighted")


def pareto_front(values: list[list[float]], directions: list[str]) -> list[int]:
    """Indices of the points no other point dominates (each value signed by its direction)."""
    signed = [[v if d == "maximize" else -v for v, d in zip(row, directions)] for row in values]

    def dominates(a, b):
        return all(x >= y for x, y in zip(a, b)) and any(x > y for x, y in zip(a, b))

    return [i for i, p in enumerate(signed) if not any(dominates(q, p) for q in signed)]


def front_of(records: list[TrialRecord], rule: Aggregate) -> list[TrialRecord]:
    """The complete successful trials no other one beats on every objective of ``rule``."""
    names = rule.names
    complete = [r for r in records if r.complete and all(n in r.values for n in names)]
    directions = ["maximize" if rule.weights[n] >= 0 else "minimize" for n in names]
    return [complete[i] for i in pareto_front([[r.values[n] for n in names] for r in complete], directions)]


def share_references(records: list[TrialRecord], rule: Aggregate) -> dict[str, float]:
    """Per objective, what its share is of: its reference when it is
    normalized, else the best source's dev score (none when no source was
    scored on it)."""
    out = dict(rule.references)
    sources = [r for r in records if r.kind == "baseline" and is_source(r.name) and r.ok]
    for name, w in rule.weights.items():
        got = [r.values[name] for r in sources if name in r.values]
        if name not in out and got:
            out[name] = max(got) if w >= 0 else min(got)
    return out


def shares(record: TrialRecord, references: dict[str, float], rule: Aggregate) -> dict[str, float]:
    """The share of each objective's reference a trial keeps."""
    return dataclasses.replace(rule, references=references).retention(record.values)


def pick(records: list[TrialRecord], how: str, rule: Aggregate) -> TrialRecord:
    """The front's point that ``how`` (one of :data:`PICKS`) chooses."""
    if how not in PICKS:
        raise EvomergeError(f"unknown pick rule {how!r}; use one of {', '.join(PICKS)}")
    front = front_of(records, rule)
    if not front:
        raise EvomergeError("the run has no trial scored on every dev document yet; run the search longer")
    if how == "weighted":
        weighted = dataclasses.replace(rule, rule="sum")
        return max(front, key=lambda r: (weighted.value(r.values), -r.number))
    references = share_references(records, rule)
    missing = [n for n in rule.names if n not in references]
    if missing:
        raise EvomergeError(
            f"--pick max-min needs a reference for objective {missing[0]} (no source was scored on it); "
            "run the baselines, give the objective 'normalize: <number>', or use --pick weighted"
        )
    return max(front, key=lambda r: (min(shares(r, references, rule).values()), -r.number))


__all__ = ["PICKS", "front_of", "pareto_front", "pick", "share_references", "shares"]
