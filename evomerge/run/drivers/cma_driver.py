"""CMA-ES through pycma, in the space's unit cube, with optional IPOP restarts."""

from __future__ import annotations

import dataclasses
import math
import pickle
import random
from pathlib import Path
from typing import Literal

import numpy as np

from evomerge.engine.folder import atomic_write
from evomerge.run.drivers.base import Candidate, Driver
from evomerge.run.drivers.settings import DriverSettings, knob


class CmaSettings(DriverSettings):
    """pycma's knobs (pycma refuses a population under 2)."""

    name: Literal["cma"] = "cma"
    sigma0: knob(float, 0.2, low=0, high=1, low_open=True, doc="initial step, a fraction of each range")
    popsize: knob(int, None, low=2, doc="default: pycma's 4 + 3 ln(dimensions)")
    restarts: knob(int, 9, low=0, doc="IPOP restarts, each doubling the population")


STATE_FILE = "cma_state.pkl"  # in the run folder


class CmaDriver(Driver):
    """pycma's ``CMAEvolutionStrategy`` with bounds [0, 1] in every coordinate.

    ``sigma0`` is relative to each parameter's range. With ``restarts`` > 0,
    a converged run restarts from a random point with twice the population
    (IPOP-CMA-ES). The strategy is pickled to ``state_path`` after each
    generation (pycma has no other serialisation; the file is the run's own),
    and a resumed strategy asks exactly the generation the killed one asked,
    so its finished candidates come back from the cache.

    pycma needs two coordinates at least: a one-parameter space (slerp's
    global ``t``) gets a second, unused coordinate, which decoding ignores.

    With several workers the population is shared among them; its default
    size (pycma's 4 + 3 ln n) is rounded up to a multiple of the worker
    count, so no worker idles in a generation of equally slow candidates.
    """

    name = "cma"

    def __init__(self, space, store, settings: CmaSettings, seed: int, workers: int = 1, run_dir: Path | None = None):
        self.space = space
        self.store = store
        self.state_path = Path(run_dir if run_dir is not None else store.run_dir) / STATE_FILE
        self.settings = settings
        self.seed = seed
        self._pad = [0.5] if space.dim == 1 else []  # an unused coordinate (pycma needs two)
        if self.state_path.is_file():
            with open(self.state_path, "rb") as f:
                state = pickle.load(f)  # noqa: S301 - written by this driver in this run folder
            self.es, self.restarts, self.popsize = state["es"], state["restarts"], state["popsize"]
        else:
            self.es = None
            self.restarts = 0
            self.popsize = settings.value("popsize")
            if self.popsize is None and workers > 1:
                default = 4 + int(3 * math.log(max(space.dim, 1)))
                self.popsize = -(-default // workers) * workers
        self._x0 = space.x0() + self._pad
        # Trials this driver recorded before a crash, by (generation, index).
        self._seen = {
            (r.extra["cma_generation"], r.extra["cma_index"]): r
            for r in store.trials(heldout=False)
            if "cma_generation" in r.extra
        }
        self._inject: list[list[float]] = []

    def _new_strategy(self, x0: list[float]):
        import cma

        opts = {
            "bounds": [0.0, 1.0],
            "seed": self.seed * 1000 + self.restarts + 1,  # pycma treats seed 0 as "random"
            "verbose": -9,
        }
        if self.popsize:
            opts["popsize"] = self.popsize
        es = cma.CMAEvolutionStrategy(x0, self.settings.value("sigma0"), opts)
        self.popsize = es.popsize
        return es

    def start_from(self, points):
        if self.es is not None or not points:
            return
        xs = [self.space.params_to_unit(p) + self._pad for p in points]
        self._x0 = xs[0]
        self._inject = xs

    def ask(self) -> list[Candidate]:
        if self.es is None:
            self.es = self._new_strategy(self._x0)
            if self._inject:
                self.es.inject(self._inject[: self.es.popsize], force=True)
            self._save()
        if self.es.stop() and not self._restart():
            return []
        xs = self.es.ask()
        generation = f"{self.restarts}:{self.es.countiter}"
        dim = self.space.dim
        return [
            Candidate(
                self.space.decode(x[:dim]),
                self.space.unit_to_params(x[:dim]),
                x=list(map(float, x)),
                extra={"cma_generation": generation, "cma_index": i},
            )
            for i, x in enumerate(xs)
        ]

    def _restart(self) -> bool:
        if self.restarts >= self.settings.value("restarts"):
            return False
        self.restarts += 1
        self.popsize = self.es.popsize * 2
        rng = random.Random(self.seed * 1000 + self.restarts)
        self.es = self._new_strategy([rng.random() for _ in range(self.space.dim)] + self._pad)
        self._save()
        return True

    def record(self, candidate, values, record) -> None:
        record = dataclasses.replace(record, extra={**record.extra, **candidate.extra})
        self.store.add(record, values, candidate.params, self.space.distributions())

    def recorded(self, candidate):
        # A resumed strategy asks the generation the killed one asked; the
        # candidates it finished are in the study already.
        seen = self._seen.get((candidate.extra["cma_generation"], candidate.extra["cma_index"]))
        if seen is None or seen.fingerprint != candidate.recipe.fingerprint():
            return None
        return list(seen.told), seen

    def tell(self, candidates, values) -> None:
        # pycma minimises; fitness is higher-is-better. It finds the genotype
        # of each solution it asked (and which were injected) by the solution
        # array's bytes: pass arrays, never lists, or every solution counts as
        # foreign (its genotype rebuilt and clipped), and every injected one
        # as lost ("orphanated injected solution" warnings).
        self.es.tell([np.asarray(c.x, dtype=float) for c in candidates], [-v[0] for v in values])
        self._save()

    def should_stop(self) -> bool:
        return self.es is not None and bool(self.es.stop()) and self.restarts >= self.settings.value("restarts")

    def _save(self) -> None:
        atomic_write(self.state_path, pickle.dumps({"es": self.es, "restarts": self.restarts, "popsize": self.popsize}))
