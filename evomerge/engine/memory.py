"""The memory plan of an in-place merger: what each strategy keeps resident,
per device, computed from the safetensors headers before any tensor is read.

Strategies (:data:`STRATEGIES`):

- ``cached``: the live model, every source tensor in the compute dtype, and
  what the methods cache across candidates (task vectors, magnitude orders
  and ranks, SCE's spread): the fastest per candidate.
- ``lean``: the live model and the sources only; the caches are recomputed
  per tensor per candidate (the same arithmetic as a merge to disk, so the
  same bits). About (experts + 2) model sizes.
- ``offload``: on a GPU, the sources stay in (pinned) host memory and each
  tensor's inputs are copied to the device as it is merged: the device holds
  the live model and one tensor's worth of temporaries. On a CPU it is lean.

``auto`` picks the first of cached, lean, offload that fits the budget
(default: 90% of each device's free memory).
"""

from __future__ import annotations

import os
import re
import weakref
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from evomerge.engine.devices import plan_layers
from evomerge.engine.methods.base import TensorInputs
from evomerge.errors import EvomergeError

STRATEGIES = ("cached", "lean", "offload")
MODES = ("auto", *STRATEGIES)
DEFAULT_BUDGET = 0.9  # of each device's free memory
SAMPLE = (64, 256)  # the small tensor a method's caches are measured on
FINE_TUNE_SCALE = 0.02  # a sample fine-tune's change, relative to its weights' spread
_LAYER = re.compile(r"\.layers\.(\d+)\.")


@dataclass
class DeviceBytes:
    """What one device holds, by kind, in bytes."""

    live: int = 0  # the live model's parameters
    sources: int = 0  # every source tensor, in the compute dtype
    cache: int = 0  # what the cached strategy keeps besides
    build: int = 0  # the most one tensor's cache build holds at once, above its caches
    temporaries: int = 0  # the most one tensor's merge without caches holds at once
    transfer: int = 0  # offload: one tensor's inputs copied to the device


@dataclass
class MemoryPlan:
    """Resident bytes per strategy, per device; ``host`` is what offload keeps in host memory."""

    devices: list[torch.device]
    parts: list[DeviceBytes]
    host: int = 0
    model_bytes: int = 0  # the live model, for "model sizes"
    caches: dict[str, tuple[int, int]] = field(default_factory=dict)  # tensor -> (device index, cache bytes)
    host_limit: int | None = None  # what offload may keep in host memory (None: unchecked)

    def need(self, strategy: str) -> list[int]:
        """Bytes per device that ``strategy`` keeps resident (peaks included)."""
        out = []
        for device, part in zip(self.devices, self.parts):
            if strategy == "cached":
                out.append(part.live + part.sources + part.cache + max(part.build, part.temporaries))
            elif strategy == "lean" or device.type == "cpu":
                out.append(part.live + part.sources + part.temporaries)
            else:  # offload on an accelerator
                out.append(part.live + part.transfer + part.temporaries)
        return out

    def cache_within(self, limits: list[int]) -> set[str]:
        """The tensors whose caches fit beside the lean strategy under
        ``limits``, in the model's order: what ``auto`` keeps when the cached
        strategy as a whole does not fit."""
        room = [limit - need for limit, need in zip(limits, self.need("lean"))]
        kept = set()
        for name, (where, size) in self.caches.items():
            if 0 < size <= room[where]:
                room[where] -= size
                kept.add(name)
        return kept

    def fits(self, strategy: str, budgets: list[int]) -> bool:
        if strategy == "offload" and self.on_gpu() and self.host_limit is not None and self.host > self.host_limit:
            return False  # the sources must fit in host memory
        return all(need <= budget for need, budget in zip(self.need(strategy), budgets))

    def describe(self, strategy: str) -> str:
        """One line: the strategy, its bytes per device, in GB and model sizes."""
        needs = self.need(strategy)
        where = ", ".join(f"{size_text(n)} on {d}" for n, d in zip(needs, self.devices))
        sizes = sum(needs) / self.model_bytes if self.model_bytes else 0.0
        host = (
            f"; {size_text(self.host)} in host memory" if strategy == "offload" and self.host and self.on_gpu() else ""
        )
        return f"{strategy}: {where} ({sizes:.1f} model sizes){host}"

    def on_gpu(self) -> bool:
        return any(d.type != "cpu" for d in self.devices)

    def table(self, limits: list[int], mode: str = "auto") -> str:
        """Every strategy's bytes per device against ``limits``, and what ``mode`` takes."""
        width = max(12, *(len(str(d)) + 3 for d in self.devices))
        head = "strategy  " + "".join(f"{str(d):>{width}}" for d in self.devices) + "  model sizes  fits"
        rows = [head, "budget    " + "".join(f"{size_text(b):>{width}}" for b in limits)]
        for strategy in STRATEGIES:
            needs = self.need(strategy)
            sizes = sum(needs) / self.model_bytes if self.model_bytes else 0.0
            note = "" if strategy != "offload" or self.on_gpu() else "  (on a CPU, offload is lean)"
            fits = "yes" if self.fits(strategy, limits) else "no"
            cells = "".join(f"{size_text(n):>{width}}" for n in needs)
            rows.append(f"{strategy:<10}{cells}  {sizes:>11.1f}  {fits:<4}{note}")
        if self.host and self.on_gpu():
            rows.append(f"offload also keeps {size_text(self.host)} of sources in host memory")
        return "\n".join(rows)


def size_text(n: int) -> str:
    """Bytes for people: GB (10^9) with two decimals, MB or kB below one GB."""
    if n >= 1e9:
        return f"{n / 1e9:.2f} GB"
    return f"{n / 1e6:.1f} MB" if n >= 1e6 else f"{n / 1e3:.1f} kB"


def _numel(shape) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def _nbytes(value) -> int:
    if isinstance(value, torch.Tensor):
        return value.numel() * value.element_size()
    if isinstance(value, (tuple, list)):
        return sum(_nbytes(v) for v in value)
    return 0


@dataclass
class SampleBytes:
    """Bytes per element of one output tensor, measured on a sample merge."""

    cache: float  # what the cached strategy keeps
    build: float  # the most alive at once while the caches are built, above them
    lean: float  # the most alive at once merging without caches


_SORTS = {torch.ops.aten.sort, torch.ops.aten.argsort, torch.ops.aten.topk, torch.ops.aten.kthvalue}


class _LiveBytes(TorchDispatchMode):
    """Counts the bytes of the tensors torch ops create while they are alive,
    and their peak (kernels' internal scratch is not seen)."""

    def __init__(self, outside: set[int]):
        super().__init__()
        self.outside, self.now, self.peak = outside, 0, 0
        self._alive: set[int] = set()

    def _release(self, key: int, n: int) -> None:
        self._alive.discard(key)
        self.now -= n

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func.overloadpacket in _SORTS and isinstance(args[0], torch.Tensor):
            # A sort's own scratch, unseen here, beside its outputs: on the
            # CPU, measured (peak RSS of argsort), twice its keys and int64 indices.
            scratch = 2 * args[0].numel() * (args[0].element_size() + 8)
            self.peak = max(self.peak, self.now + scratch + _nbytes(list(tree_flatten(out)[0])))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor):
                key = t.untyped_storage().data_ptr()
                if key and key not in self.outside and key not in self._alive:
                    n = t.untyped_storage().nbytes()
                    self._alive.add(key)
                    self.now += n
                    self.peak = max(self.peak, self.now)
                    weakref.finalize(t, self._release, key, n)
        return out


def sample_bytes(merges, seed: int = 0) -> SampleBytes:
    """What merging one output tensor costs per element, measured on a small
    sample. ``merges``: (method, job) pairs for that tensor, one per recipe;
    the cached run puts all into one cache, keyed by their inputs, so what
    they share (task vectors) is counted once."""
    g = torch.Generator().manual_seed(seed)
    shape = SAMPLE if len(merges[0][1].shape) >= 2 else (SAMPLE[0] * SAMPLE[1],)
    # Sample weights like a fine-tune's: a base, and small changes to it, in
    # the compute dtype; how a method caches depends on how its task vectors
    # tie (in bfloat16 they tie a lot), so the sample must tie as they do.
    base = torch.randn(shape, generator=g) * 0.02
    samples: dict = {}
    tied: dict = {}  # the same, with changes on a coarse grid: equal magnitudes straddle every cut
    for _method, job in merges:
        for i, key in enumerate(job.inputs):
            if (key, job.compute_dtype) not in samples:
                change = 0 if i == job.base_index else torch.randn(shape, generator=g) * 0.02 * FINE_TUNE_SCALE
                samples[(key, job.compute_dtype)] = (base + change).to(job.compute_dtype)
                coarse = 0 if i == job.base_index else torch.round(change / (0.005 * FINE_TUNE_SCALE))
                tied[(key, job.compute_dtype)] = (base + coarse * 0.005 * FINE_TUNE_SCALE).to(job.compute_dtype)
    outside = {t.untyped_storage().data_ptr() for t in [*samples.values(), *tied.values()]}
    n = _numel(shape)
    cache: dict = {}
    lean = 0
    with _LiveBytes(outside) as build:
        for method, job in merges:
            tensors = [samples[(key, job.compute_dtype)] for key in job.inputs]
            method.fn(
                TensorInputs(job.name, tensors, job.base_index, seed, cache, job.inputs, resident=True), job.params
            )
    kept = sum(_nbytes(v) for v in cache.values())
    # Without caches, the most a merge allocates: with ties at the cut, the
    # magnitude methods fall back to a full sort (the case at scale).
    for method, job in merges:
        tensors = [tied[(key, job.compute_dtype)] for key in job.inputs]
        with _LiveBytes(outside) as one:
            method.fn(TensorInputs(job.name, tensors, job.base_index, seed, None, job.inputs), job.params)
        lean = max(lean, one.peak)
    return SampleBytes(kept / n, max(0, build.peak - kept) / n, lean / n)


def layer_devices(jobs, n_devices: int) -> dict[str, int]:
    """The device index of each output tensor, as the live model is split
    (layers in contiguous runs of about equal size; the rest on the first)."""
    if n_devices == 1:
        return {j.name: 0 for j in jobs}
    layer_of = {j.name: int(m.group(1)) if (m := _LAYER.search(j.name)) else None for j in jobs}
    layers = sorted({i for i in layer_of.values() if i is not None})
    sizes = {i: 0 for i in layers}
    ends = 0
    for j in jobs:
        if layer_of[j.name] is None:
            ends += j.nbytes
        else:
            sizes[layer_of[j.name]] += j.nbytes
    index = dict(zip(layers, plan_layers([sizes[i] for i in layers], ends, n_devices)))
    return {j.name: 0 if layer_of[j.name] is None else index[layer_of[j.name]] for j in jobs}


def plan_memory(plans, devices: list[torch.device]) -> MemoryPlan:
    """The memory plan of merging ``plans`` (``MergePlan``\\ s of one layout:
    the template, or every method a search may pick) in place on ``devices``."""
    first = plans[0]
    names = [j.name for j in first.jobs]
    plans = [p for p in plans if [j.name for j in p.jobs] == names]  # the template's layout only
    where = layer_devices(first.jobs, len(devices))
    parts = [DeviceBytes() for _ in devices]
    seen: set[tuple[str, str]] = set()
    host = 0
    factors: dict[tuple, SampleBytes] = {}
    caches: dict[str, tuple[int, int]] = {}
    for i, job in enumerate(first.jobs):
        part = parts[where[job.name]]
        numel = _numel(job.shape)
        size = job.compute_dtype.itemsize
        part.live += job.nbytes
        fresh = [key for key in job.inputs if key not in seen]
        seen.update(fresh)
        part.sources += len(fresh) * numel * size
        host += len(fresh) * numel * size
        merges = [(p.method, p.jobs[i]) for p in plans]
        key = (
            len(job.shape) >= 2,
            repr([(m.name, j.inputs, j.base_index, j.compute_dtype, j.params) for m, j in merges]),
        )
        if key not in factors:
            factors[key] = sample_bytes(merges)
        sample = factors[key]
        part.cache += int(sample.cache * numel)
        caches[job.name] = (where[job.name], int(sample.cache * numel))
        # One tensor at a time: what the merge allocates (the build of its
        # caches, or its work without them); offload also copies its inputs in.
        part.build = max(part.build, int(sample.build * numel))
        part.temporaries = max(part.temporaries, int(sample.lean * numel))
        part.transfer = max(part.transfer, len(job.inputs) * numel * size)
    return MemoryPlan(devices, parts, host, sum(j.nbytes for j in first.jobs), caches=caches)


def recipe_plan(recipes, root, devices: list[torch.device], allow_outside: bool = False) -> MemoryPlan:
    """The memory plan of merging ``recipes`` in place (headers only): the
    first is the template whose sources are held, the others may be merged too."""
    from evomerge.engine.plan import open_sources, plan_merge

    sources = open_sources(recipes[0], root, allow_outside)
    return plan_memory([plan_merge(r, sources) for r in recipes], devices)


_M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter
_HEAP_CEILING = 32 << 20  # glibc's own ceiling for blocks served from the heap


@contextmanager
def mapped_large_blocks():
    """While long-lived tensors are made in host memory (the sources loaded,
    the caches built), glibc serves every block of 1 MiB or more from its own
    mapping, so the temporaries freed between them go back to the system
    instead of leaving holes in the heap that the process keeps (measured:
    bfloat16 TIES's caches took 25% more than they hold without this).
    Afterwards blocks up to 32 MiB come from the heap again, where glibc's
    adaptive threshold ends up anyway. Elsewhere than glibc, nothing changes."""
    libc = _glibc()
    if libc is None:
        yield
        return
    libc.mallopt(_M_MMAP_THRESHOLD, 1 << 20)
    try:
        yield
    finally:
        libc.mallopt(_M_MMAP_THRESHOLD, _HEAP_CEILING)


def _glibc():
    import ctypes
    import platform

    if platform.libc_ver()[0] != "glibc":
        return None
    try:
        return ctypes.CDLL("libc.so.6")
    except OSError:
        return None


def free_bytes(device: torch.device) -> int:
    """Free memory on ``device``: the GPU's free bytes, or the host's available memory."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free)
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


_UNITS = {"": 1, "B": 1, "KB": 1e3, "MB": 1e6, "GB": 1e9, "TB": 1e12, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}


def parse_budget(value) -> float:
    """A memory budget: a fraction of the free memory (``0.8``), bytes, or a
    size (``70GB``: 10^9 bytes a GB; ``64GiB``: 2^30)."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        number = float(value)
    else:
        text = str(value).strip().upper().replace(" ", "")
        digits = text.rstrip("KMGTIB")
        try:
            number = float(digits) * _UNITS[text[len(digits) :]]
        except (KeyError, ValueError):
            raise ValueError(
                f"{value!r} is not a memory budget; give a fraction such as 0.8 or a size such as 70GB"
            ) from None
    if not number > 0:
        raise ValueError(f"{value!r} is not positive; give a fraction such as 0.8 or a size such as 70GB")
    return number


def budgets(devices: list[torch.device], budget: float | int | None) -> list[int]:
    """Bytes each device may hold: ``budget`` as a fraction (at most 1) of its
    free memory, or as bytes; default 90% of the free memory."""
    budget = DEFAULT_BUDGET if budget is None else budget
    if budget <= 0:
        raise EvomergeError(f"memory budget {budget} is not positive; give a fraction in (0, 1] or bytes")
    if budget <= 1:
        return [int(budget * free_bytes(d)) for d in devices]
    return [int(budget)] * len(devices)


def host_budget() -> int:
    """What offload may pin in host memory: 90% of the host's available memory."""
    return int(DEFAULT_BUDGET * free_bytes(torch.device("cpu")))


def choose(plan: MemoryPlan, mode: str, limits: list[int]) -> str:
    """The strategy ``mode`` stands for under ``limits`` (bytes per device);
    one line naming the numbers and the fix when none fits."""
    if mode not in MODES:
        raise EvomergeError(f"memory strategy {mode!r} is unknown; use one of {', '.join(MODES)}")
    tried = STRATEGIES if mode == "auto" else (mode,)
    for strategy in tried:
        if plan.fits(strategy, limits):
            return strategy
    budget = ", ".join(f"{size_text(b)} on {d}" for b, d in zip(limits, plan.devices))
    leanest = "offload" if plan.on_gpu() else "lean"  # on a CPU, offload is lean
    if leanest == "offload" and plan.host_limit is not None and plan.host > plan.host_limit:
        host = f"; offload's sources need {size_text(plan.host)} of host memory, {size_text(plan.host_limit)} may be pinned"
    else:
        host = ""
    if mode == "auto":
        need, fixes = f"even {plan.describe(leanest)}{host}", ""
    else:
        need = plan.describe(mode)
        fixes = "memory: auto, " if plan.fits(leanest, limits) else ""
        if mode != leanest:
            need += f" (leanest: {plan.describe(leanest)})"
    raise EvomergeError(
        f"the in-place merge does not fit: {need} against a budget of {budget}; "
        f"use {fixes}more devices (device: cuda:all), a smaller dtype or fewer experts, or raise the memory budget"
    )


__all__ = [
    "DEFAULT_BUDGET",
    "MODES",
    "STRATEGIES",
    "MemoryPlan",
    "budgets",
    "sample_bytes",
    "choose",
    "free_bytes",
    "mapped_large_blocks",
    "parse_budget",
    "plan_memory",
    "recipe_plan",
    "size_text",
]
