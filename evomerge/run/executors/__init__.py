"""Executors: where candidates are merged and scored.

The search loop hands an executor recipes (``submit``) and collects scores
(``wait``); it never sees weights. Contract:

- ``free()``: how many more candidates can start now without waiting. The
  search asks its driver for that many and submits them, so no worker sits
  idle while the driver could give it work.
- ``submit(key, recipe, job)``: start scoring ``recipe`` as the
  :class:`~evomerge.run.executors.worker.Job` (or just its ``which``: ``dev``,
  ``heldout``, ``both`` or ``select``) says, as in :meth:`Worker.score`.
- ``wait()``: block until at least one submitted candidate finishes; return
  ``[(key, score)]``, each score the worker's :class:`~evomerge.fitness.evaluate.Score`.
  A candidate that cannot be scored at all (its worker kept dying) comes back
  as a failed score with the reason, never as an exception.
- ``close()``: stop the workers (and whatever the executor started).

``local`` (default) scores in the search's own process; ``ray`` scores on
resident Ray actors (see :mod:`evomerge.run.executors.ray_executor`).
"""

from __future__ import annotations

from collections import deque
from pathlib import Path
from typing import Any

from evomerge.engine.recipe import Recipe
from evomerge.fitness.evaluate import Score
from evomerge.run.executors.worker import Job, Worker, WorkerSpec


class Executor:
    """Base class; see the module docstring for the contract."""

    name = "executor"
    workers = 1

    def free(self) -> int:
        raise NotImplementedError

    def submit(self, key: Any, recipe: Recipe, job: Job | str = "dev") -> None:
        raise NotImplementedError

    def wait(self) -> list[tuple[Any, Score]]:
        raise NotImplementedError

    def pending(self) -> int:
        """Candidates submitted and not yet returned by ``wait``."""
        raise NotImplementedError

    def close(self) -> None:
        """Stop the workers; safe to call twice."""


class LocalExecutor(Executor):
    """One worker in this process: ``wait`` scores the next submitted candidate."""

    name = "local"

    def __init__(self, worker: Worker):
        self.worker = worker
        self._queue: deque = deque()

    def free(self) -> int:
        return 0 if self._queue else 1

    def submit(self, key, recipe, job="dev") -> None:
        self._queue.append((key, recipe, job))

    def pending(self) -> int:
        return len(self._queue)

    def wait(self) -> list[tuple[Any, Score]]:
        key, recipe, job = self._queue[0]
        score = self.worker.score(recipe, job)
        self._queue.popleft()  # only once scored: an interrupted candidate stays pending
        return [(key, score)]


def make_executor(
    settings, spec: WorkerSpec, local_worker: Worker | None = None, log=print, run_dir: Path | None = None
) -> Executor:
    """The executor a config's ``executor`` section names. ``run_dir``: the
    run folder, where a Ray executor records the Ray instance it starts (and
    whose stopped driver's instance it ends first)."""
    if settings.name == "ray":
        from evomerge.run.executors.ray_executor import RAY_RECORD, RayExecutor, reap

        record = Path(run_dir) / RAY_RECORD if run_dir is not None else None
        if record is not None:
            reap(record, log)
        return RayExecutor(settings, spec, log=log, record=record)
    return LocalExecutor(local_worker if local_worker is not None else Worker(spec))


__all__ = ["Executor", "Job", "LocalExecutor", "Worker", "WorkerSpec", "make_executor"]
