"""The executor base: where candidates are merged and scored.

The search loop hands an executor recipes (``submit``) and collects scores
(``wait``); it never sees weights. Contract:

- ``free()``: how many more candidates can start now without waiting. The
  search asks its driver for that many and submits them, so no worker sits
  idle while the driver could give it work.
- ``submit(key, recipe, job)``: start scoring ``recipe`` as the
  :class:`~evomerge.run.executors.worker.Job` (or just its ``which``: ``dev``,
  ``heldout``, ``both`` or ``select``) says, as in :meth:`Worker.score`.
- ``wait()``: block until at least one submitted candidate finishes; return
  ``[(key, score)]``, each score the worker's :class:`~evomerge.fitness.score.Score`.
  A candidate that cannot be scored at all (its worker kept dying) comes back
  as a failed score with the reason, never as an exception.
- ``close()``: stop the workers (and whatever the executor started).

``local`` (default) scores in the search's own process; ``ray`` scores on
resident Ray actors (see :mod:`evomerge.run.executors.ray_executor`).
"""

from __future__ import annotations

import abc
from typing import Any

from evomerge.engine.recipe import Recipe
from evomerge.fitness.score import Score
from evomerge.run.executors.worker import Job


class Executor(abc.ABC):
    """Where candidates are merged and scored; the module docstring is the
    contract every executor keeps (``tests/run/executors/executor_contract.py``
    checks it on each one)."""

    name = "executor"
    workers = 1

    @abc.abstractmethod
    def free(self) -> int:
        raise NotImplementedError

    @abc.abstractmethod
    def submit(self, key: Any, recipe: Recipe, job: Job | str = "dev") -> None:
        raise NotImplementedError

    @abc.abstractmethod
    def wait(self) -> list[tuple[Any, Score]]:
        raise NotImplementedError

    @abc.abstractmethod
    def pending(self) -> int:
        """Candidates submitted and not yet returned by ``wait``."""
        raise NotImplementedError

    def close(self) -> None:  # noqa: B027 - optional: an executor with nothing to stop keeps it
        """Stop the workers; safe to call twice."""
