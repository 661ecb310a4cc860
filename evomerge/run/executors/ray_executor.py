"""Ray executor: resident worker actors, no generation barrier, survives worker loss.

Each worker is a long-lived Ray actor holding a :class:`Worker` (the sources
with their task vectors, one live model, the prebuilt lm-eval tasks). A
candidate travels to it as a recipe (a few KB) and comes back as a
:class:`~evomerge.fitness.score.Score`; weights never cross the network, and only
the driver writes to the storage.

Fault tolerance: actors are created with ``max_restarts`` so Ray restarts a
worker whose process dies (killed, out of memory, node lost). The candidate
it was scoring goes back to the front of the queue and runs on the next free
worker (another one when there is one), up to ``retries`` times; after that
it is returned as failed with the reason. A worker whose restart is refused
(its restarts used up, or no node can take it) leaves the pool; when none is
left the run stops with an error.

A Ray instance the executor starts itself (no ``address``) is shut down on
close, Ctrl-C included. A driver killed with kill -9 cannot do that, and the
instance's processes (GCS, raylet, its agents and workers) outlive it; so the
executor records their PIDs in the run folder (``RAY_RECORD``), and the next
search in that folder ends exactly those before it starts (:func:`reap`).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from evomerge.engine.devices import ALL
from evomerge.errors import EvomergeError
from evomerge.fitness.score import Score
from evomerge.run.executors.base import Executor
from evomerge.run.executors.worker import Worker, WorkerSpec

RAY_RECORD = "ray_instance.json"  # in the run folder: the processes of the Ray instance a driver started
REPROBE_S = 0.5  # how often to ask a restarting worker whether it is back


class _Actor:
    """The body of a worker actor. A worker that cannot be built (sources
    differ from the driver's, a missing file on this node) reports why from
    ``ready`` instead of crash-looping."""

    def __init__(self, spec: WorkerSpec):
        import ray

        self.worker = None
        self.error = None
        if spec.device is None and len(ray.get_gpu_ids()) > 1:
            # A model larger than one GPU: split it over all of this worker's GPUs.
            spec = dataclasses.replace(spec, device=ALL)
        try:
            self.worker = Worker(spec)
        except EvomergeError as e:
            self.error = str(e)
        except Exception as e:  # noqa: BLE001 - reported to the driver, which stops the run
            self.error = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"

    def ready(self) -> dict[str, Any]:
        import socket

        import ray

        return {
            "error": self.error,
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "gpus": [str(g) for g in ray.get_gpu_ids()],
            "devices": [str(d) for d in self.worker.merger.devices] if self.worker else [],
            "memory": self.worker.memory_line() if self.worker else None,
        }

    def score(self, recipe: dict, job) -> tuple[Score, tuple[float, float]]:
        """The score, and when this worker started and finished it (for the executor's timeline)."""
        started = time.time()
        if self.worker is None:
            score = Score.failed(f"worker could not start: {self.error}")
        else:
            score = self.worker.score(recipe, job)
        return score, (started, time.time())


@dataclass
class _Job:
    key: Any
    recipe: dict
    job: Any  # a worker Job, or its "which"
    attempts: int = 0
    last_worker: int | None = None
    errors: list[str] = field(default_factory=list)


class RayExecutor(Executor):
    """Scores candidates on ``settings.workers`` resident Ray actors."""

    name = "ray"

    def __init__(self, settings, spec: WorkerSpec, log=print, record: Path | None = None):
        os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
        import ray

        self.ray = ray
        self.settings = settings
        self.log = log
        self.record = record  # where to record the Ray instance this executor starts (None: nowhere)
        self._owns_ray = False
        self._groups: list = []
        self._actors: list = []
        self._connect()
        try:
            self._start_workers(spec)
            if self._owns_ray and record is not None:
                _record_instance(record)
        except BaseException:
            self.close()
            raise
        # worker index -> refs of its candidates (running, then queued in its mailbox)
        self._busy: dict[int, list] = {i: [] for i in range(len(self._actors))}
        # Each worker holds its running candidate plus ``prefetch`` queued
        # ones, so it starts the next the moment it finishes, while the
        # driver records results and asks for more.
        self._depth = 1 + settings.prefetch
        self._jobs: dict[Any, tuple[_Job, int]] = {}  # ref -> (job, worker index)
        self._probes: dict[Any, int] = {}  # ref of a ready() call -> worker index
        self._queue: deque[_Job] = deque()
        self._dead: set[int] = set()
        self._lost_at: dict[int, float] = {}  # worker index -> when it died
        self._reprobe: dict[int, float] = {}  # worker index -> when to ask a restarting worker again
        self.restarts = 0  # workers lost and back again
        # (worker index, start, end) of every scored candidate, wall clock on
        # the worker: the gaps between one worker's spans are its idle time.
        self.timeline: list[tuple[int, float, float]] = []

    # -- start and stop ------------------------------------------------------

    def _connect(self) -> None:
        ray, s = self.ray, self.settings
        if ray.is_initialized():
            return  # this process already joined a Ray instance (a notebook, a test): use it, leave it running
        common = dict(log_to_driver=s.log_to_driver, logging_level=logging.WARNING)
        try:
            if s.address is None:
                ray.init(
                    include_dashboard=s.dashboard,
                    _system_config={"enable_metrics_collection": s.metrics},
                    **common,
                )
            else:
                ray.init(address=s.address, **common)
        except ConnectionError as e:
            first = str(e).splitlines()[0] if str(e) else type(e).__name__
            raise EvomergeError(
                f"cannot reach a Ray cluster at {s.address!r} ({first}); start one with 'ray start --head' "
                "or fix executor.address"
            ) from None
        self._owns_ray = True

    def _start_workers(self, spec: WorkerSpec) -> None:
        ray, s = self.ray, self.settings
        resources = ray.cluster_resources()
        gpus = s.num_gpus if s.num_gpus is not None else (1.0 if resources.get("GPU", 0) >= 1 else 0.0)
        if s.workers is not None:
            count = s.workers
        elif gpus:
            count = int(resources.get("GPU", 0) // gpus)
        else:
            count = int(resources.get("CPU", 1) // s.num_cpus)
        if count < 1:
            raise EvomergeError(
                f"the Ray cluster has {resources.get('GPU', 0):g} GPUs and {resources.get('CPU', 0):g} CPUs, "
                f"too few for one worker ({gpus:g} GPUs, {s.num_cpus:g} CPUs); lower executor.num_gpus or add nodes"
            )
        # One worker's resources must fit on one node (a placement group
        # of several GPUs too); otherwise Ray would wait for such a node forever.
        need = {"GPU": gpus, "CPU": s.num_cpus, "memory": s.memory or 0}
        nodes = [n["Resources"] for n in ray.nodes() if n.get("Alive")]
        for key, amount in need.items():
            largest = max((n.get(key, 0) for n in nodes), default=0)
            if amount > largest:
                what = {"GPU": "num_gpus", "CPU": "num_cpus", "memory": "memory"}[key]
                raise EvomergeError(
                    f"executor.{what} is {amount:g} per worker, but no node of the Ray cluster has more than "
                    f"{largest:g}{' bytes' if key == 'memory' else ''}; a worker runs on one node: lower "
                    f"executor.{what} or add a larger node"
                )
        self.workers = count
        self._options = {
            "num_cpus": s.num_cpus,
            "num_gpus": gpus,
            "max_restarts": s.max_restarts,
            "max_task_retries": 0,  # the executor retries, on another worker when it can
        }
        if s.memory is not None:
            self._options["memory"] = s.memory
        self._spec = spec
        self._actors = [self._new_actor(i) for i in range(count)]
        refs = [a.ready.remote() for a in self._actors]
        try:
            infos = ray.get(refs, timeout=s.start_timeout)
        except ray.exceptions.GetTimeoutError:
            raise EvomergeError(
                f"{count} Ray workers ({gpus:g} GPUs, {s.num_cpus:g} CPUs each) did not all start within "
                f"{s.start_timeout:g} s; the cluster may lack the resources: lower executor.workers or add nodes"
            ) from None
        except ray.exceptions.RayActorError as e:
            raise EvomergeError(f"a Ray worker died while starting ({_reason(e)}); check the worker logs") from None
        for info in infos:
            if info["error"]:
                raise EvomergeError(f"worker on {info['host']}: {info['error']}")
        self.info = infos
        where = "; ".join(f"{i} on {x['host']} ({','.join(x['devices'])})" for i, x in enumerate(infos))
        self.log(f"{count} Ray worker{'s' if count != 1 else ''} ready: {where}")
        for line in sorted({x["memory"] for x in infos if x.get("memory")}):
            self.log(f"Ray workers' {line}")

    def _new_actor(self, index: int):
        ray = self.ray
        options = dict(self._options)
        if options["num_gpus"] > 1:
            # A model larger than one GPU: reserve the worker's GPUs together
            # on one node; the worker splits its model over them by layers.
            from ray.util.placement_group import placement_group
            from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

            # The actor asks for exactly its bundle (memory too, when set).
            bundle = {"GPU": options["num_gpus"], "CPU": options["num_cpus"]}
            if "memory" in options:
                bundle["memory"] = options["memory"]
            group = placement_group([bundle], strategy="STRICT_PACK", name=f"evomerge-worker-{index}")
            self._groups.append(group)
            options["scheduling_strategy"] = PlacementGroupSchedulingStrategy(placement_group=group)
        return ray.remote(_Actor).options(name=None, **options).remote(self._spec)

    def close(self) -> None:
        ray = self.ray
        for actor in self._actors:
            try:
                ray.kill(actor, no_restart=True)
            except Exception:  # noqa: BLE001 - already gone
                pass
        self._actors = []
        if self._groups:
            from ray.util.placement_group import remove_placement_group

            for group in self._groups:
                try:
                    remove_placement_group(group)
                except Exception:  # noqa: BLE001
                    pass
            self._groups = []
        if self._owns_ray and ray.is_initialized():
            ray.shutdown()
            if self.record is not None:
                self.record.unlink(missing_ok=True)
        self._owns_ray = False

    def pids(self) -> list[int]:
        """The workers' current process ids (for tests and diagnostics)."""
        return [info["pid"] for info in self.ray.get([a.ready.remote() for a in self._actors])]

    # -- scheduling ------------------------------------------------------------

    def _slots(self) -> list[int]:
        """Worker indices with room for one more candidate, once per free
        place, least loaded first."""
        away = set(self._probes.values()) | set(self._reprobe) | self._dead
        live = [i for i in range(len(self._actors)) if i not in away]
        live.sort(key=lambda i: len(self._busy[i]))
        return [i for n in range(self._depth) for i in live if len(self._busy[i]) <= n]

    def free(self) -> int:
        return max(0, len(self._slots()) - len(self._queue))

    def pending(self) -> int:
        return len(self._queue) + len(self._jobs)

    def submit(self, key, recipe, job="dev") -> None:
        self._queue.append(_Job(key, recipe.model_dump(mode="json", exclude_none=True), job))
        self._pump()

    def _pump(self) -> None:
        slots = self._slots()
        while self._queue and slots:
            job = self._queue.popleft()
            # A retried candidate goes to another worker when one has room.
            index = next((i for i in slots if i != job.last_worker), slots[0])
            slots.remove(index)
            ref = self._actors[index].score.remote(job.recipe, job.job)
            job.last_worker = index
            self._busy[index].append(ref)
            self._jobs[ref] = (job, index)

    def wait(self) -> list[tuple[Any, Score]]:
        ray = self.ray
        out = []
        while not out:
            self._pump()
            now = time.monotonic()
            for index, when in list(self._reprobe.items()):
                if when <= now:
                    del self._reprobe[index]
                    self._probes[self._actors[index].ready.remote()] = index
            refs = [*self._jobs, *self._probes]
            if not refs and not self._reprobe:
                if self._queue:
                    raise EvomergeError("every Ray worker is gone; check the worker logs and the cluster")
                return out
            timeout = max(0.0, min(self._reprobe.values()) - now) if self._reprobe else None
            ready, rest = ray.wait(refs, num_returns=1, timeout=timeout) if refs else ([], [])
            if not refs:
                time.sleep(timeout)
            if rest:
                ready += ray.wait(rest, num_returns=len(rest), timeout=0)[0]
            for ref in ready:
                if ref in self._probes:
                    self._probe_done(ref)
                    continue
                job, index = self._jobs.pop(ref)
                self._busy[index].remove(ref)
                try:
                    score, span = ray.get(ref)
                    self.timeline.append((index, *span))
                    score.attempts = job.attempts + 1
                    out.append((job.key, score))
                except ray.exceptions.RayActorError as e:
                    self._lost(index, job, _reason(e), out)
                except ray.exceptions.RayError as e:  # the call itself failed (e.g. a result too large)
                    out.append((job.key, Score.failed(f"worker error: {_reason(e)}")))
        return out

    def _lost(self, index: int, job: _Job, reason: str, out: list) -> None:
        job.attempts += 1
        job.errors.append(reason)
        limit = self.settings.retries
        if job.attempts > limit:
            self.log(f"worker {index} died scoring a candidate ({reason}); {job.attempts} tries, recorded as failed")
            failed = Score.failed(f"worker died {job.attempts} times scoring this candidate (last: {reason})")
            out.append((job.key, dataclasses.replace(failed, attempts=job.attempts)))
        else:
            self.log(f"worker {index} died ({reason}); retrying its candidate (try {job.attempts + 1} of {limit + 1})")
            self._queue.appendleft(job)
        # Ray restarts the actor; ask it to report once it is back.
        if index not in self._probes.values() and index not in self._reprobe and index not in self._dead:
            self._lost_at[index] = time.monotonic()
            self._probes[self._actors[index].ready.remote()] = index

    def _probe_done(self, ref) -> None:
        index = self._probes.pop(ref)
        try:
            info = self.ray.get(ref)
        except self.ray.exceptions.ActorUnavailableError:
            self._reprobe[index] = time.monotonic() + REPROBE_S  # still restarting: ask again shortly
            return
        except self.ray.exceptions.RayActorError as e:
            self._dead.add(index)
            self.log(f"worker {index} is gone for good ({_reason(e)}); {len(self._actors) - len(self._dead)} left")
            return
        self.restarts += 1
        if info["error"]:
            self._dead.add(index)
            self.log(f"worker {index} restarted on {info['host']} but cannot score: {info['error']}")
        else:
            took = time.monotonic() - self._lost_at.pop(index, time.monotonic())
            self.log(f"worker {index} restarted on {info['host']} (pid {info['pid']}) in {took:.1f} s")


def _reason(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    first = next((line for line in text if line.strip()), type(e).__name__)
    return f"{type(e).__name__}: {first}"[:300]


__all__ = ["RayExecutor"]


def _record_instance(path: Path) -> None:
    """Record the processes of the Ray instance this process started (all its
    descendants: GCS, raylet, agents, workers), with their start times."""
    import psutil

    from evomerge.engine.folder import atomic_write

    procs = []
    for p in psutil.Process().children(recursive=True):
        try:
            procs.append({"pid": p.pid, "created": p.create_time(), "name": p.name()})
        except psutil.Error:
            continue  # ended meanwhile
    atomic_write(path, json.dumps(procs, indent=1) + "\n")


def reap(path: Path, log=print) -> int:
    """End the processes a stopped driver's Ray instance left running, as
    recorded in ``path`` (only those: a PID whose start time differs was
    reused by another process and is left alone); return how many ended."""
    import psutil

    if not path.is_file():
        return 0
    ended = []
    for entry in json.loads(path.read_text()):
        try:
            p = psutil.Process(entry["pid"])
            if abs(p.create_time() - entry["created"]) < 0.01:
                p.kill()
                ended.append(p)
        except psutil.Error:
            continue  # gone already, or not ours to end
    psutil.wait_procs(ended, timeout=10)
    path.unlink()
    if ended:
        log(f"ended {len(ended)} processes of the Ray instance that a stopped driver of this run left running")
    return len(ended)
