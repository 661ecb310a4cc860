"""The driver base: an ask/tell wrapper around an optimizer.

A driver proposes candidates (``ask``), learns from their scores (``tell``)
and says when it has nothing more to propose (``should_stop``). Scores given
to ``tell`` are "higher is better" fitness values (or, for multi-objective
drivers, one value per objective in each objective's own direction); a failed
candidate arrives with the penalty the search documents (the worst value seen
so far), never as an exception.

Every trial lives in the run's store (:mod:`evomerge.run.store`, over an Optuna
study): Optuna drivers ask its study for trials and finish them through the
store; the pycma driver adds finished trials to it and checkpoints its own
state after every generation. How asks and tells interleave with scoring is
the search's schedule (:mod:`evomerge.run.schedulers`), chosen by ``asynchronous``.
"""

from __future__ import annotations

import abc
from dataclasses import dataclass, field
from typing import Any

from evomerge.engine.recipe import Recipe
from evomerge.run.record import TrialRecord


@dataclass
class Candidate:
    """One proposed recipe, with the point it came from."""

    recipe: Recipe
    params: dict[str, Any]
    trial: Any = None  # the Optuna trial, for Optuna drivers
    x: Any = None  # the unit-cube vector, for pycma
    extra: dict[str, Any] = field(default_factory=dict)


class Driver(abc.ABC):
    """An optimizer behind ask/tell; the module docstring is the contract
    every driver keeps (``tests/run/driver_contract.py`` checks it on each
    one). Only ``ask`` and ``record`` must be written; the rest have
    defaults that do nothing."""

    name = "driver"
    multi_objective = False
    # True: ``ask`` may be called while earlier candidates are still being
    # scored (one candidate per call). False: ``ask`` returns a generation,
    # and the next ``ask`` comes after ``tell`` of that whole generation.
    asynchronous = False

    @abc.abstractmethod
    def ask(self) -> list[Candidate]:
        """The next candidates; an empty list when there is nothing to ask."""
        raise NotImplementedError

    @abc.abstractmethod
    def record(self, candidate: Candidate, values: list[float], record: TrialRecord) -> None:
        """Store one finished candidate as a trial, as soon as it is scored."""
        raise NotImplementedError

    def recorded(self, candidate: Candidate) -> tuple[list[float], TrialRecord] | None:
        """A candidate this driver already stored (before a crash), or None."""
        return None

    def tell(self, candidates: list[Candidate], values: list[list[float]]) -> None:  # noqa: B027 - an optional hook
        """Learn from a whole batch (after each candidate was recorded)."""

    def should_stop(self) -> bool:
        return False

    def start_from(self, points: list[dict[str, Any]]) -> None:  # noqa: B027 - an optional hook
        """Hint: named points (the baselines the space can express), best first."""
