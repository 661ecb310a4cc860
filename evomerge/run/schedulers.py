"""Schedules: how a driver's candidates reach free workers and their results return.

Both schedules keep one contract, which the search loop drives:

- ``next()``: a candidate for a free worker, or None when none can be handed
  out now (``exhausted`` tells whether the driver has nothing more at all);
- ``known(c, outcome)``: a candidate's result known without scoring (cached,
  or recorded before a crash), which the loop records at once;
- ``take(c, outcome)``: a worker's result; True when the loop records it now,
  False when the schedule holds it back until ``flush()``;
- ``held``: results held back (they count against the budget);
- ``tell_complete()`` and ``complete()``: a whole batch is scored.

:class:`AsyncSchedule` serves asynchronous drivers (Optuna's samplers): a new
candidate is asked whenever a worker frees up, and each result is recorded at
once, so the sampler learns it before the next ask. :class:`GenerationSchedule`
serves generation drivers (pycma): a whole population is shared among the
workers, its results are recorded only after the workers got their next
candidates (a storage write never keeps a worker waiting), and the driver is
told once its last member is scored, before the next generation is asked.
"""

from __future__ import annotations

from collections import deque
from typing import Any


class AsyncSchedule:
    """One candidate per free worker from an asynchronous driver."""

    held = 0

    def __init__(self, driver):
        self.driver = driver
        self.exhausted = False

    def next(self):
        if self.exhausted or self.driver.should_stop():
            self.exhausted = True
            return None
        return self.driver.ask()[0]

    def known(self, candidate, outcome) -> None:
        pass

    def take(self, candidate, outcome) -> bool:
        return True

    def flush(self) -> list[tuple[Any, Any]]:
        return []

    def tell_complete(self) -> None:
        pass

    def complete(self) -> bool:
        return False


class GenerationSchedule:
    """A generation driver's populations, shared among the workers."""

    def __init__(self, driver):
        self.driver = driver
        self.exhausted = False
        self.generation: list | None = None  # the population being scored
        self.scored: dict[int, Any] = {}  # its finished members' outcomes, by index
        self.queue: deque[int] = deque()  # its members not yet handed out
        self.later: list[tuple[Any, Any]] = []  # scored, recorded after the next hand-out

    @property
    def held(self) -> int:
        return len(self.later)

    def next(self):
        if self.exhausted:
            return None
        if not self.queue:
            if self.generation is not None:
                return None  # the rest of this generation is being scored
            asked = self.driver.ask()
            if not asked:
                self.exhausted = True
                return None
            self.generation, self.scored, self.queue = asked, {}, deque(range(len(asked)))
        return self.generation[self.queue.popleft()]

    def _index(self, candidate) -> int:
        return next(i for i, member in enumerate(self.generation) if member is candidate)

    def known(self, candidate, outcome) -> None:
        self.scored[self._index(candidate)] = outcome

    def take(self, candidate, outcome) -> bool:
        self.scored[self._index(candidate)] = outcome
        self.later.append((candidate, outcome))
        return False

    def flush(self) -> list[tuple[Any, Any]]:
        out, self.later = self.later, []
        return out

    def complete(self) -> bool:
        return self.generation is not None and len(self.scored) == len(self.generation)

    def tell_complete(self) -> None:
        if self.complete():
            self.driver.tell(self.generation, [self.scored[i].values for i in range(len(self.generation))])
            self.generation = None


def make_schedule(driver):
    """The schedule a driver needs."""
    return AsyncSchedule(driver) if driver.asynchronous else GenerationSchedule(driver)
