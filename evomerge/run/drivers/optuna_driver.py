"""Optuna's samplers as drivers: TPE, GP, CMA-ES, random and NSGA-II."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from evomerge.run.drivers.base import Candidate, Driver
from evomerge.run.drivers.settings import DriverSettings, knob

_STARTUP = {"low": 0, "doc": "random trials before the sampler models the scores"}


class OptunaSettings(DriverSettings):
    """The settings of a driver that is one of Optuna's samplers."""

    def sampler(self, seed: int, workers: int = 1):
        """The Optuna sampler these settings stand for, seeded, for ``workers`` parallel asks."""
        raise NotImplementedError


class TpeSettings(OptunaSettings):
    name: Literal["tpe"] = "tpe"
    startup_trials: knob(int, 10, **_STARTUP)

    def sampler(self, seed: int, workers: int = 1):
        # With several workers, TPE treats running trials as bad ones
        # (constant liar), so parallel asks spread out instead of piling up.
        import optuna

        startup = self.value("startup_trials")
        return optuna.samplers.TPESampler(
            seed=seed, multivariate=True, n_startup_trials=startup, constant_liar=workers > 1
        )


class GpSettings(OptunaSettings):
    name: Literal["gp"] = "gp"
    startup_trials: knob(int, 10, **_STARTUP)

    def sampler(self, seed: int, workers: int = 1):
        import optuna

        return optuna.samplers.GPSampler(seed=seed, n_startup_trials=self.value("startup_trials"))


class CmaEsSettings(OptunaSettings):
    """Optuna's CMA-ES (the cmaes package fails at a population of 1)."""

    name: Literal["cmaes"] = "cmaes"
    popsize: knob(int, None, low=2, doc="default: Optuna's 4 + 3 ln(dimensions)")

    def sampler(self, seed: int, workers: int = 1):
        import optuna

        # Optuna's own start (the centre) and step: its sigma0 and x0 arguments are deprecated.
        popsize = self.value("popsize")
        return optuna.samplers.CmaEsSampler(seed=seed, popsize=popsize, warn_independent_sampling=False)


class RandomSettings(OptunaSettings):
    name: Literal["random"] = "random"

    def sampler(self, seed: int, workers: int = 1):
        import optuna

        return optuna.samplers.RandomSampler(seed=seed)


class Nsga2Settings(OptunaSettings):
    """NSGA-II, the multi-objective driver (Optuna refuses a population under 2)."""

    name: Literal["nsga2"] = "nsga2"
    popsize: knob(int, 16, stored=None, low=2, doc="individuals per generation")

    def sampler(self, seed: int, workers: int = 1):
        import optuna

        return optuna.samplers.NSGAIISampler(seed=seed, population_size=self.value("popsize"))


class OptunaDriver(Driver):
    """Asks the study (with the configured sampler) one trial at a time.

    The sampler learns from every complete trial in the study, baselines
    included; on resume it is reseeded with the trial count, so a resumed run
    does not replay the proposals it already made. Asynchronous: a trial is
    asked whenever a worker frees up, while others are still running.
    """

    asynchronous = True

    def __init__(
        self, space, store, settings: OptunaSettings, seed: int, workers: int = 1, run_dir: Path | None = None
    ):
        self.space = space
        self.store = store
        self.study = store.study  # Optuna's public API: ask, and the sampler
        self.name = settings.name
        self.multi_objective = settings.name == "nsga2"
        self.settings = settings
        self.seed = seed + len(self.study.trials)
        self.study.sampler = settings.sampler(self.seed, workers)

    def ask(self) -> list[Candidate]:
        trial = self.study.ask()
        self.store.started(trial)  # on a shared storage: this folder's, and alive
        recipe = self.space.suggest(trial)
        return [Candidate(recipe, dict(trial.params), trial=trial)]

    def record(self, candidate, values, record) -> None:
        self.store.tell(candidate.trial, record, values)
