"""The worker: sources, one live model and the evaluators, scoring recipes.

A worker is built once from a :class:`WorkerSpec` (plain data, a few KB, the
same for every worker) and then scores recipes one at a time: merge in place
(and route), evaluate, return a :class:`~evomerge.fitness.score.Score`. The local
executor runs one in the search's own process; the Ray executor runs one per
actor.
"""

from __future__ import annotations

import dataclasses
import socket
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from evomerge.engine.recipe import Recipe
from evomerge.errors import EvomergeError
from evomerge.fitness.score import Score

WHICH = ("dev", "heldout", "both", "select")


@dataclass(frozen=True)
class Job:
    """What a worker does with a recipe: score it on the ``which`` documents
    (``dev``, ``heldout``, ``both``: dev then held-out, or ``select``);
    ``part``: only these documents (see :meth:`Evaluator.score`);
    ``versus``: stop early against the incumbent (dev only); ``rungs``:
    multi-fidelity scoring (dev only)."""

    which: str = "dev"
    part: dict[str, tuple[int, int]] | None = None
    versus: Any = None  # an evomerge.fitness.score.Versus
    rungs: Any = None  # an evomerge.fitness.estimate.Rungs

    def __post_init__(self):
        if self.which not in WHICH:
            raise ValueError(self.which)

    @classmethod
    def of(cls, job: Job | str) -> Job:
        return job if isinstance(job, Job) else cls(job)


@dataclass(frozen=True)
class WorkerSpec:
    """Everything a worker needs to build itself, as plain data.

    ``template`` is the recipe whose sources the live model is built from
    (None for a routing run over sources of different depths); ``routed``
    lists the models a route may use (None: not a routing run). ``sha256``
    maps each model reference to ``{file: digest}`` as the driver read them;
    a worker whose files differ refuses to score.
    """

    config: dict[str, Any]
    root: str
    tokenizer: str
    template: dict[str, Any] | None
    routed: list[str] | None = None
    max_depth: int | None = None
    device: str | None = None
    allow_outside: bool = False
    allow_test_sets: bool = False
    sha256: dict[str, dict[str, str]] = field(default_factory=dict)
    # Recipes the merger's memory plan must hold besides the template (the
    # baselines, the space's first candidate): their methods' caches.
    also: list[dict[str, Any]] = field(default_factory=list)


def source_digests(refs: list[str], root: Path, allow_outside: bool) -> dict[str, dict[str, str]]:
    """``{ref: {weight file: sha256}}`` for each model reference."""
    from evomerge.engine.models import resolve_model_path, sha256_file

    out = {}
    for ref in dict.fromkeys(refs):
        folder = resolve_model_path(ref, root, allow_outside)
        out[ref] = {p.name: sha256_file(p) for p in sorted(folder.glob("*.safetensors"))}
    return out


def check_digests(spec: WorkerSpec) -> None:
    """Refuse (EvomergeError) when this node's sources differ from the driver's."""
    if not spec.sha256:
        return
    mine = source_digests(list(spec.sha256), Path(spec.root), spec.allow_outside)
    host = socket.gethostname()
    for ref, files in spec.sha256.items():
        if set(mine[ref]) != set(files):
            raise EvomergeError(
                f"on {host}, model {ref} has weight files {sorted(mine[ref])}, the driver has {sorted(files)}; "
                "put the same model on every node"
            )
        for name, digest in files.items():
            if mine[ref][name] != digest:
                raise EvomergeError(
                    f"on {host}, sha256 of {ref}/{name} is {mine[ref][name][:12]}..., the driver's is {digest[:12]}...; "
                    "put the same model on every node"
                )


def build_evaluators(spec: WorkerSpec, device: str):
    """The config, the dev evaluator, the held-out one and the selection one
    (None when the config has no such section). The selection evaluator
    never scores a document the dev or held-out evaluator scores."""
    from evomerge.fitness.evaluate import Evaluator
    from evomerge.run.config import SearchConfig

    cfg = SearchConfig.model_validate(spec.config)
    common = dict(
        root=Path(spec.root),
        device=device,
        allow_test_sets=spec.allow_test_sets,
        allow_outside_paths=spec.allow_outside,
    )
    dev = Evaluator(cfg.eval, spec.tokenizer, **common)
    heldout = Evaluator(cfg.heldout, spec.tokenizer, **common) if cfg.heldout else None
    select = None
    if cfg.select is not None:
        taken: dict[str, list[int]] = {}
        for ev in (dev, heldout):
            for task, order in (ev.order if ev is not None else {}).items():
                taken[task] = taken.get(task, []) + order
        select = Evaluator(cfg.select.spec(cfg.eval), spec.tokenizer, exclude=taken, **common)
    return cfg, dev, heldout, select


class Worker:
    """Holds the sources (task vectors cached), one live model and the
    prebuilt evaluators; ``score`` never raises for a bad candidate."""

    def __init__(self, spec: WorkerSpec):
        check_digests(spec)
        self.spec = spec
        device = spec.device  # None: the first GPU, or the CPU; a list splits the model (evomerge.engine.devices)
        self.cfg, self.dev, self.heldout, self.select = build_evaluators(spec, device)
        template = Recipe.model_validate(spec.template) if spec.template is not None else None
        root = Path(spec.root)
        memory = {
            "memory": self.cfg.memory.strategy,
            "memory_budget": self.cfg.memory.budget,
            "also": [Recipe.model_validate(r) for r in spec.also],
        }
        if spec.routed is not None:
            from evomerge.engine.routing import RouteMerger

            self.merger = RouteMerger(
                template,
                routed=spec.routed,
                root=root,
                device=device,
                allow_outside=spec.allow_outside,
                max_depth=spec.max_depth,
                **memory,
            )
        else:
            from evomerge.engine.merge import InPlaceMerger

            self.merger = InPlaceMerger(template, root=root, device=device, allow_outside=spec.allow_outside, **memory)

    def _in_place(self):
        """The in-place merger (a routing run's parameter-space one), if any."""
        merger = getattr(self.merger, "merger", self.merger)  # a RouteMerger holds one, or None
        return merger if hasattr(merger, "memory_plan") else None

    def memory_record(self) -> dict[str, Any] | None:
        """The memory strategy chosen and its planned bytes per device (for run.yaml)."""
        merger = self._in_place()
        if merger is None:
            return None
        return {"strategy": merger.strategy, "asked": self.cfg.memory.strategy, "planned_bytes": merger.planned_bytes}

    def memory_line(self) -> str | None:
        """One line: the strategy, how it was chosen, and its plan."""
        merger = self._in_place()
        if merger is None:
            return None
        how = "chosen by memory: auto" if self.cfg.memory.strategy == "auto" else "as the config asks"
        return f"memory: {merger.memory_summary()}, {how}"

    def score(self, recipe: Recipe | dict, job: Job | str = "dev") -> Score:
        """Merge ``recipe`` into the live model and score it as ``job`` says.

        ``which``: ``dev`` (the search's objectives), ``heldout``, ``select``,
        or ``both`` (the held-out score goes in ``heldout``, and only when the
        dev score succeeded). ``seconds`` counts the merge (``merge_seconds``)
        and the evaluation.
        """
        job = Job.of(job)
        which = job.which
        if isinstance(recipe, dict):
            recipe = Recipe.model_validate(recipe)
        t0 = time.perf_counter()
        try:
            model = self.merger.apply(recipe)
        except Exception as e:  # noqa: BLE001 - a failed candidate is data, not a crash
            failed = Score.failed(f"{type(e).__name__}: {e}", time.perf_counter() - t0)
            return dataclasses.replace(failed, heldout=failed) if which == "both" else failed
        merge_seconds = time.perf_counter() - t0
        evaluator = {"heldout": self.heldout, "select": self.select}.get(which, self.dev)
        if evaluator is None:
            return Score.failed(f"the config has no {which} section")
        dev = evaluator.per_doc and which in ("dev", "both")
        evaluated = evaluator.score(
            model,
            part=job.part if evaluator.per_doc else None,
            versus=job.versus if dev else None,
            rungs=job.rungs if dev else None,
        )
        score = dataclasses.replace(evaluated, seconds=merge_seconds + evaluated.seconds, merge_seconds=merge_seconds)
        if which == "both" and self.heldout is not None and score.ok:
            score.heldout = self.heldout.score(model)
        return score
