"""Executors: where candidates are merged and scored.

``base`` holds the contract (:class:`Executor`); ``local`` (default) scores
in the search's own process; ``ray`` scores on resident Ray actors (see
:mod:`evomerge.run.executors.ray_executor`); ``worker`` is what each of
them runs: merge a recipe into the live model and score it.
"""

from __future__ import annotations

from pathlib import Path

from evomerge.run.executors.base import Executor
from evomerge.run.executors.local import LocalExecutor
from evomerge.run.executors.worker import Job, Worker, WorkerSpec


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
