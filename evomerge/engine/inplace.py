"""The in-place merger: a candidate recipe merged into one resident model's
parameters, for search (``InPlaceMerger``), and the empty live model it
fills (``build_model``). evomerge.engine.routing builds its hybrids on it."""

from __future__ import annotations

import contextlib
from pathlib import Path

import torch

from evomerge.engine.devices import parse_devices, place
from evomerge.engine.memory import budgets, choose, host_budget, mapped_large_blocks, plan_memory, size_text
from evomerge.engine.plan import FUSE_MIN_PARAMS, merge_tensor, open_sources, plan_merge, referenced
from evomerge.engine.recipe import Recipe
from evomerge.errors import EvomergeError


class InPlaceMerger:
    """Merges candidate recipes into one resident model, for search.

    The sources stay resident on ``device`` (default: the GPU when there is
    one; a list such as ``cuda:0,cuda:1`` splits the model and the sources
    by layers, see evomerge.engine.devices) in the compute dtype; task vectors
    and magnitude ranks are computed on first use and kept. ``apply`` then
    rewrites the live model's parameters in place: no disk I/O and no
    allocation proportional to the model, only per-tensor temporaries.
    ``fuse`` runs the elementwise work through torch.compile (bit-identical;
    default: on for models of ``FUSE_MIN_PARAMS`` parameters or more).

    ``memory`` is the strategy (see evomerge.engine.memory): ``cached``
    keeps task vectors and magnitude orders across candidates, ``lean``
    recomputes them per tensor (about experts + 2 model sizes), ``offload``
    keeps the sources in host memory; ``auto`` (default) takes the fastest
    that fits ``memory_budget`` (a fraction of each device's free memory,
    default 0.9, or bytes), and when that is lean it still keeps the caches
    of as many tensors as fit the budget. All give the same bits.
    ``strategy``, ``cached_tensors`` and ``memory_plan`` say what was chosen.

    Every recipe given to ``apply`` must use the sources of the template
    recipe and produce the same tensor names and shapes.
    """

    def __init__(
        self,
        template: Recipe,
        *,
        root: Path | str = ".",
        device: str | None = None,
        allow_outside: bool = False,
        model: torch.nn.Module | None = None,
        fuse: bool | None = None,
        memory: str = "auto",
        memory_budget: float | int | None = None,
        also: list[Recipe] | None = None,
    ):
        self.devices = parse_devices(device)
        self.root = Path(root)
        self.sources = open_sources(template, root, allow_outside)
        plan = plan_merge(template, self.sources)
        self.config = plan.config
        self._choose_memory(plan, also, memory, memory_budget)
        self.model = model if model is not None else build_model(plan.config, plan.jobs[0].out_dtype, self.devices)
        named = dict(self.model.named_parameters(remove_duplicate=False))
        named.update(dict(self.model.named_buffers()))
        missing = [j.name for j in plan.jobs if j.name not in named]
        if missing:
            raise EvomergeError(
                f"the live model has no parameter {missing[0]}; its architecture does not match the sources"
            )
        self._targets = {j.name: named[j.name] for j in plan.jobs}
        with mapped_large_blocks():
            self._load_sources(plan)
        written = {t.data_ptr() for t in self._targets.values()}
        unwritten = [n for n, p in self.model.named_parameters() if p.data_ptr() not in written]
        if unwritten:
            raise EvomergeError(
                f"no source provides the live model's parameter {unwritten[0]}; the sources do not match its config"
            )
        # Fusing the elementwise tail with torch.compile costs seconds once
        # and then makes each candidate several times faster; same bits
        # either way. Worth it from tens of millions of parameters.
        n_params = sum(t.numel() for t in self._targets.values())
        self.fuse = fuse if fuse is not None else n_params >= FUSE_MIN_PARAMS

    def _choose_memory(self, plan, also, memory: str, memory_budget) -> None:
        """The memory plan, from the headers, before any tensor is read, and
        the strategy under the budget. ``also``: other recipes of the same
        layout whose caches the plan must hold (every method a search may pick)."""
        others = [plan_merge(r, self.sources) for r in also or []]
        self.memory_plan = plan_memory([plan, *others], self.devices)
        if any(d.type != "cpu" for d in self.devices):
            self.memory_plan.host_limit = host_budget()
        limits = budgets(self.devices, memory_budget)
        self.strategy = choose(self.memory_plan, memory, limits)
        # The tensors whose caches are kept: all (cached), none (lean or
        # offload as asked), or under auto's lean those that fit the budget.
        self.cached_tensors: set[str] = set()
        if self.strategy == "cached":
            self.cached_tensors = {j.name for j in plan.jobs}
        elif self.strategy == "lean" and memory == "auto":
            self.cached_tensors = self.memory_plan.cache_within(limits)
        self._cache: dict | None = {} if self.cached_tensors else None
        self._built: set[str] = set()  # methods whose caches are built

    def _load_sources(self, plan) -> None:
        """Each source tensor, in the compute dtype, where the parameter it
        merges into sits (one device, or the layer's device when the model is
        split); offload keeps them in (pinned) host memory instead."""
        self._tensors: dict[tuple[str, str], torch.Tensor] = {}
        for job in plan.jobs:
            for ref, name in job.inputs:
                key = (ref, name)
                if key in self._tensors:
                    continue
                where = self._targets[job.name].device
                if self.strategy == "offload" and where.type != "cpu":
                    where = torch.device("cpu")  # copied to the device tensor by tensor
                tensor = self.sources[ref].get(name).to(where, job.compute_dtype)
                if where.type == "cpu" and self.strategy == "offload" and torch.cuda.is_available():
                    tensor = tensor.pin_memory()
                self._tensors[key] = tensor

    @property
    def planned_bytes(self) -> list[int]:
        """The plan's bytes per device for what this merger holds (a partial cache included)."""
        need = self.memory_plan.need("lean" if self.strategy == "cached" else self.strategy)
        for name in self.cached_tensors:
            where, size = self.memory_plan.caches[name]
            need[where] += size
        return need

    def memory_summary(self) -> str:
        """The strategy and its bytes; under auto's lean, the share of the caches kept."""
        plan = self.memory_plan
        if self.strategy != "lean" or not self.cached_tensors:
            return plan.describe(self.strategy)
        kept = sum(plan.caches[n][1] for n in self.cached_tensors)
        share = kept / max(1, sum(size for _, size in plan.caches.values()))
        where = ", ".join(f"{size_text(n)} on {d}" for n, d in zip(self.planned_bytes, self.devices))
        sizes = sum(self.planned_bytes) / plan.model_bytes if plan.model_bytes else 0.0
        return f"lean: {where} ({sizes:.1f} model sizes), keeping {share:.0%} of the caches that fit the budget"

    def _load(self, ref: str, name: str) -> torch.Tensor:
        return self._tensors[(ref, name)]  # apply() checked every key first

    @torch.no_grad()
    def apply(self, recipe: Recipe) -> torch.nn.Module:
        """Rewrite the live model's weights to be ``recipe``'s merge."""
        unknown = set(referenced(recipe)) - set(self.sources)
        if unknown:
            raise EvomergeError(
                f"recipe uses model {sorted(unknown)[0]}, which this merger did not load; "
                "create the merger from a recipe with the same sources"
            )
        plan = plan_merge(recipe, self.sources)
        for job in plan.jobs:
            target = self._targets.get(job.name)
            if target is None or tuple(target.shape) != job.shape:
                raise EvomergeError(
                    f"recipe produces tensor {job.name} {job.shape}, which the live model lacks; "
                    "use a recipe with the template's layout"
                )
        not_loaded = [key for job in plan.jobs for key in job.inputs if key not in self._tensors]
        if not_loaded:
            ref, name = not_loaded[0]
            raise EvomergeError(
                f"recipe needs {ref}:{name}, which this merger did not load; create the merger from a recipe "
                "with the same sources and layout"
            )
        if len(plan.jobs) != len(self._targets):
            stale = sorted(set(self._targets) - {j.name for j in plan.jobs})[0]
            raise EvomergeError(
                f"recipe does not produce {stale}, which the live model has; use a recipe with the template's layout"
            )
        # A method's first candidate builds its caches: long-lived blocks,
        # made between temporaries; without caches, each tensor's temporaries
        # are many and large (a sort's). Both would leave holes in the heap
        # (see mapped_large_blocks); a cached candidate's few reuse it.
        building = self._cache is not None and plan.method.name not in self._built
        uncached = len(self.cached_tensors) < len(plan.jobs)
        with mapped_large_blocks() if building or uncached else contextlib.nullcontext():
            for job in plan.jobs:
                target = self._targets[job.name]
                cache = self._cache if job.name in self.cached_tensors else None
                merge_tensor(
                    job,
                    plan.method,
                    self._load,
                    recipe.seed,
                    target.device,
                    cache,
                    cache is not None,
                    self.fuse,
                    target,
                )
        self._built.add(plan.method.name)
        return self.model


def build_model(config: dict, dtype: torch.dtype, device) -> torch.nn.Module:
    """An uninitialised Hugging Face causal LM for ``config`` (no remote code)
    on ``device``, or split over a list of devices (see evomerge.engine.devices)."""
    import transformers

    kwargs = dict(config)
    model_type = kwargs.pop("model_type", None)
    try:
        cfg = transformers.AutoConfig.for_model(model_type, **kwargs)
    except (ValueError, KeyError):
        raise EvomergeError(
            f"model type {model_type!r} is not built into transformers, and evomerge never runs a model's own "
            "code (trust_remote_code); use a supported architecture"
        ) from None
    try:
        from transformers.initialization import no_init_weights
    except ImportError:  # transformers < 5
        from transformers.modeling_utils import no_init_weights
    with no_init_weights():
        model = transformers.AutoModelForCausalLM.from_config(cfg, dtype=dtype, trust_remote_code=False)
    model.tie_weights()  # skipped under no_init_weights; tied heads must share storage
    return place(model, parse_devices(device)).eval()
