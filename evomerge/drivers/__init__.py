"""Drivers: ask/tell wrappers around the optimizers.

A driver proposes candidates (``ask``), learns from their scores (``tell``)
and says when it has nothing more to propose (``should_stop``). Scores given
to ``tell`` are "higher is better" fitness values (or, for multi-objective
drivers, one value per objective in each objective's own direction); a failed
candidate arrives with the penalty the search documents (the worst value seen
so far), never as an exception.

Every trial lives in the run's store (:mod:`evomerge.store`, over an Optuna
study): Optuna drivers ask its study for trials and finish them through the
store; the pycma driver adds finished trials to it and checkpoints its own
state after every generation. How asks and tells interleave with scoring is
the search's schedule (:mod:`evomerge.schedulers`), chosen by ``asynchronous``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from evomerge.errors import EvomergeError
from evomerge.recipe import Recipe
from evomerge.store import TrialRecord

OPTUNA_SAMPLERS = ("tpe", "gp", "cmaes", "random", "nsga2")
DRIVERS = ("cma", *OPTUNA_SAMPLERS)


@dataclass
class Candidate:
    """One proposed recipe, with the point it came from."""

    recipe: Recipe
    params: dict[str, Any]
    trial: Any = None  # the Optuna trial, for Optuna drivers
    x: Any = None  # the unit-cube vector, for pycma
    extra: dict[str, Any] = field(default_factory=dict)


class Driver:
    """Base class; see the module docstring for the contract."""

    name = "driver"
    multi_objective = False
    # True: ``ask`` may be called while earlier candidates are still being
    # scored (one candidate per call). False: ``ask`` returns a generation,
    # and the next ``ask`` comes after ``tell`` of that whole generation.
    asynchronous = False

    def ask(self) -> list[Candidate]:
        """The next candidates; an empty list when there is nothing to ask."""
        raise NotImplementedError

    def record(self, candidate: Candidate, values: list[float], record: TrialRecord) -> None:
        """Store one finished candidate as a trial, as soon as it is scored."""
        raise NotImplementedError

    def recorded(self, candidate: Candidate) -> tuple[list[float], TrialRecord] | None:
        """A candidate this driver already stored (before a crash), or None."""
        return None

    def tell(self, candidates: list[Candidate], values: list[list[float]]) -> None:
        """Learn from a whole batch (after each candidate was recorded)."""

    def should_stop(self) -> bool:
        return False

    def start_from(self, points: list[dict[str, Any]]) -> None:
        """Hint: named points (the baselines the space can express), best first."""


def make_driver(settings, space, store, run_dir: Path, seed: int, workers: int = 1) -> Driver:
    """Build the driver a config names, for ``workers`` parallel evaluations."""
    name = settings.name
    if name == "cma":
        from evomerge.drivers.cma_driver import CmaDriver

        return CmaDriver(space, store, run_dir / "cma_state.pkl", settings, seed, workers)
    if name in OPTUNA_SAMPLERS:
        from evomerge.drivers.optuna_driver import OptunaDriver

        return OptunaDriver(space, store, settings, seed, workers)
    raise EvomergeError(f"unknown driver {name!r}; use one of {', '.join(DRIVERS)}")
