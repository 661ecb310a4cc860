"""The local executor: one worker in the search's own process."""

from __future__ import annotations

from collections import deque
from typing import Any

from evomerge.fitness.score import Score
from evomerge.run.executors.base import Executor
from evomerge.run.executors.worker import Worker


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
