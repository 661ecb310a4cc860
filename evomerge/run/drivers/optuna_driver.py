"""Optuna's samplers as drivers: TPE, GP, CMA-ES, random and NSGA-II."""

from __future__ import annotations

from evomerge.run.drivers import setting
from evomerge.run.drivers.base import Candidate, Driver


def make_sampler(settings, seed: int, workers: int = 1):
    """The Optuna sampler a driver name stands for, seeded. With several
    workers, TPE treats running trials as bad ones (constant liar), so
    parallel asks spread out instead of piling onto one point."""
    import optuna

    name = settings.name
    if name == "tpe":
        startup = setting(settings, "startup_trials")
        return optuna.samplers.TPESampler(
            seed=seed, multivariate=True, n_startup_trials=startup, constant_liar=workers > 1
        )
    if name == "gp":
        return optuna.samplers.GPSampler(seed=seed, n_startup_trials=setting(settings, "startup_trials"))
    if name == "cmaes":
        # Optuna's own start (the centre) and step: its sigma0 and x0 arguments are deprecated.
        popsize = setting(settings, "popsize")
        return optuna.samplers.CmaEsSampler(seed=seed, popsize=popsize, warn_independent_sampling=False)
    if name == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    if name == "nsga2":
        return optuna.samplers.NSGAIISampler(seed=seed, population_size=setting(settings, "popsize"))
    raise ValueError(name)


class OptunaDriver(Driver):
    """Asks the study (with the configured sampler) one trial at a time.

    The sampler learns from every complete trial in the study, baselines
    included; on resume it is reseeded with the trial count, so a resumed run
    does not replay the proposals it already made. Asynchronous: a trial is
    asked whenever a worker frees up, while others are still running.
    """

    asynchronous = True

    def __init__(self, space, store, settings, seed: int, workers: int = 1):
        self.space = space
        self.store = store
        self.study = store.study  # Optuna's public API: ask, and the sampler
        self.name = settings.name
        self.multi_objective = settings.name == "nsga2"
        self.settings = settings
        self.seed = seed + len(self.study.trials)
        self.study.sampler = make_sampler(settings, self.seed, workers)

    def ask(self) -> list[Candidate]:
        trial = self.study.ask()
        recipe = self.space.suggest(trial)
        return [Candidate(recipe, dict(trial.params), trial=trial)]

    def record(self, candidate, values, record) -> None:
        self.store.tell(candidate.trial, record, values)
