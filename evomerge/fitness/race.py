"""The selection race: choosing the exported best on documents the search
never optimised on.

A search that exports the candidate with the best dev score exports the
luckiest one: out of hundreds of candidates scored on the same few hundred
documents, the top dev score is partly noise, and on unseen documents it
falls back. The race scores the ``select.top`` best search candidates by dev
fitness, and the baselines, on the selection documents
(:class:`evomerge.run.config.SelectSettings`), by successive halving:

- with E entrants there are R = ceil(log2 E) rounds; round r scores every
  entrant still in on the first ``N / 2**(R-1-r)`` documents of each task
  (at least ``min_docs``; the last round all ``N``);
- after each round but the last, the better half stays in, ranked by
  fitness on the documents all of them were scored on (the same documents,
  so this is a paired comparison); ties go to the better dev fitness;
- the winner is the best on all the selection documents.

Without per-document scores (perplexity, custom objectives, lm-eval groups)
there is one round: every entrant on every document.

:func:`plan` is pure: given what is stored, it says what to score next, or
who won. A run killed mid-race keeps the scores it stored and, run again,
scores only what is missing; a larger ``select.samples`` extends every
task's document order, so the race continues on more documents.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from evomerge.fitness.aggregate import Aggregate
from evomerge.fitness.paired import Docs, fitness, paired, prefix, standard_error


@dataclass(frozen=True)
class Entrant:
    number: int  # the trial
    dev: float  # its dev fitness


@dataclass
class Plan:
    """What the race needs next: ``needs`` (trial number -> the part of the
    selection documents to score, None for all), or, when nothing is
    missing, the ``winner`` (None when every entrant failed) and the
    ``rounds`` as run."""

    needs: dict[int, dict[str, tuple[int, int]] | None] = field(default_factory=dict)
    winner: int | None = None
    rounds: list[dict[str, Any]] = field(default_factory=list)


def plan(
    entrants: list[Entrant],
    stored: dict[int, dict[str, Any]],
    sizes: dict[str, int],
    doc_tasks: dict[str, str],
    weights: dict[str, float] | Aggregate,
    min_docs: int = 16,
) -> Plan:
    """The race's next step.

    ``stored``: trial number -> its selection scores so far (``docs``, or
    ``values`` without per-document scores, or ``failed``); ``sizes``: the
    selection documents per task; ``doc_tasks``: objective -> task for
    per-document objectives (all of them, or the race has one round);
    ``weights``: signed objective weights (:func:`evomerge.fitness.paired.signed_weights`)
    or the run's :class:`~evomerge.fitness.aggregate.Aggregate`.
    """
    weights = Aggregate.of(weights)
    per_doc = bool(doc_tasks) and set(doc_tasks) == set(weights.names)
    alive = sorted(entrants, key=lambda e: (-e.dev, e.number))
    if not alive:
        return Plan()
    rounds = max(1, math.ceil(math.log2(len(alive)))) if per_doc else 1
    log = []
    for r in range(rounds):
        last = r == rounds - 1
        if per_doc:
            share = 2.0 ** -(rounds - 1 - r)
            counts = {t: n if last else min(n, max(min_docs, math.ceil(share * n))) for t, n in sizes.items()}
            needs = {}
            for e in alive:
                have = _have(stored.get(e.number), doc_tasks)
                if have is None:
                    continue  # failed: out of the race
                missing = {t: (have.get(t, 0), c) for t, c in counts.items() if have.get(t, 0) < c}
                if missing:
                    needs[e.number] = missing
        else:
            counts = dict(sizes)
            needs = {e.number: None for e in alive if e.number not in stored}
        if needs:
            return Plan(needs=needs, rounds=log)
        scores = {e.number: _score(stored[e.number], counts, doc_tasks, weights, per_doc) for e in alive}
        ranked = sorted(alive, key=lambda e: (-scores[e.number], -e.dev, e.number))
        keep = ranked if last else ranked[: math.ceil(len(ranked) / 2)]
        keep = [e for e in keep if math.isfinite(scores[e.number])]
        log.append(
            {
                "documents": sum(counts.values()),
                "scores": {str(n): s for n, s in scores.items()},
                "kept": [e.number for e in keep],
            }
        )
        alive = keep
        if not alive:
            return Plan(rounds=log)
    return Plan(winner=alive[0].number, rounds=log)


def cost(entrants: int, sizes: dict[str, int], min_docs: int = 16) -> int:
    """The documents a race of ``entrants`` scores (with per-document
    scores, and none failing): what it adds to a search's budget."""
    field = [Entrant(i, dev=-i) for i in range(entrants)]
    stored: dict[int, dict[str, Any]] = {}
    doc_tasks = {t: t for t in sizes}
    total = 0
    while True:
        step = plan(field, stored, sizes, doc_tasks, {t: 1.0 for t in sizes}, min_docs)
        if not step.needs:
            return total
        for number, part in step.needs.items():
            docs = stored.setdefault(number, {"docs": {t: [] for t in sizes}})["docs"]
            for t, (lo, hi) in part.items():
                docs[t] += [0.0] * (hi - lo)
                total += hi - lo


def _have(entry: dict[str, Any] | None, doc_tasks: dict[str, str]) -> dict[str, int] | None:
    """Documents scored so far per task; None for a failed entrant."""
    if entry is None:
        return {}
    if "failed" in entry:
        return None
    docs = entry.get("docs") or {}
    return {task: len(docs.get(name, [])) for name, task in doc_tasks.items()}


def _score(entry: dict[str, Any], counts: dict[str, int], doc_tasks, weights, per_doc: bool) -> float:
    """An entrant's selection fitness on the first ``counts`` documents."""
    if "failed" in entry:
        return -math.inf
    if not per_doc:
        return weights.value(entry["values"])
    docs = prefix(entry["docs"], {name: counts[task] for name, task in doc_tasks.items()})
    return fitness(docs, weights)


# -- judging the result ------------------------------------------------------------


@dataclass(frozen=True)
class Estimate:
    """A fitness and its standard error (None without per-document scores)."""

    value: float
    se: float | None = None

    def __str__(self) -> str:
        return f"{self.value:.4f}" + (f" ±{1.96 * self.se:.4f}" if self.se is not None else "")


def estimate(docs: Docs | None, value: float | None, weights: dict[str, float] | Aggregate) -> Estimate | None:
    """The fitness ``value`` with its standard error from ``docs`` when they are there."""
    if value is None:
        return None
    names = Aggregate.of(weights).names
    if docs and names and set(names) <= set(docs) and all(len(docs[k]) > 1 for k in names):
        return Estimate(value, standard_error(docs, weights))
    return Estimate(value)


def selection_estimate(entry: dict[str, Any] | None, weights: dict[str, float] | Aggregate) -> Estimate | None:
    """A trial's selection fitness (on every selection document it was scored on)."""
    if not entry or "failed" in entry:
        return None
    agg = Aggregate.of(weights)
    if "docs" in entry:
        if not agg.names or not set(agg.names) <= set(entry["docs"]):
            return None
        return estimate(entry["docs"], fitness(entry["docs"], agg), agg)
    return Estimate(agg.value(entry["values"]))


@dataclass(frozen=True)
class Verdict:
    """The exported best against the best default merge (by dev fitness) on
    the held-out documents: ``diff`` = exported - default, with its paired
    standard error and two-sided p-value (None without per-document scores
    on both)."""

    winner: int
    rule: str  # "race" or "dev"
    default: int
    default_name: str
    diff: float | None = None
    se: float | None = None
    p: float | None = None
    n: int | None = None

    @property
    def same(self) -> bool:
        return self.winner == self.default

    def line(self) -> str:
        """One line for status, report and the export's metadata."""
        if self.same:
            return f"the exported best is the default merge {self.default_name} (trial {self.default})"
        if self.diff is None:
            return f"held-out against the best default merge {self.default_name}: not scored on both"
        tail = f"paired SE {self.se:.4f}, p = {self.p:.3g}" if self.se is not None else "no per-document scores"
        return (
            f"held-out against the best default merge {self.default_name} (trial {self.default}): "
            f"{self.diff:+.4f} ({tail})"
        )

    def as_dict(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in ("winner", "rule", "default", "default_name", "diff", "se", "p", "n")}


def verdict(winner, rule: str, default, weights: dict[str, float] | Aggregate) -> Verdict | None:
    """The paired held-out verdict of the run's chosen best ``winner`` (chosen
    by ``rule``) against the best default merge ``default`` (both trial
    records; ``weights``: the held-out objectives' signed weights). None
    without either."""
    if winner is None or default is None:
        return None
    out = Verdict(winner.number, rule, default.number, default.name or f"trial {default.number}")
    if out.same or winner.heldout_fitness is None or default.heldout_fitness is None:
        return out
    a, b = winner.heldout_docs, default.heldout_docs
    names = set(Aggregate.of(weights).names)
    if a and b and names and names <= set(a) and names <= set(b):
        test = paired(a, b, weights)
        return Verdict(**{**out.as_dict(), "diff": test.diff, "se": test.se, "p": test.p, "n": test.n})
    return Verdict(**{**out.as_dict(), "diff": winner.heldout_fitness - default.heldout_fitness})


__all__ = ["Entrant", "Estimate", "cost", "Plan", "Verdict", "estimate", "plan", "selection_estimate", "verdict"]
