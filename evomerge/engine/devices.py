"""Where the live model sits, and how one model is spread over several GPUs.

A device setting is ``cpu``, ``cuda``, ``cuda:N``, a comma-separated list
such as ``cuda:0,cuda:1``, or ``cuda:all`` (every GPU this process sees).
With one device the model and the sources sit on it. With several, the model
is split by layers, pipeline style (one layer runs at a time): the decoder
layers are cut into contiguous runs of about equal size, one run per device,
and the ends (embeddings, final norm, head, rotary tables) sit on the first
device, so a tied head keeps sharing its embedding's storage and the logits
come out where the input went in. Each source tensor is kept on the device
of the parameter it merges into, so the sources and their task vectors are
split the same way and every merge runs where its output lives. A device
named twice (``cpu,cpu``) takes two runs of layers: that exercises the split
without a second device.

Activations cross devices through a forward pre-hook on each placed block,
which moves the block's tensor arguments to the block's device; the layer
modules are plain torch modules, so a route that reuses a layer at several
steps works unchanged.

On the CPU, torch runs one thread per core; when other jobs keep cores busy,
those threads oversubscribe them and every candidate slows down several
times. :func:`free_core_threads` sizes torch's threads to the cores that are
free when a long command starts, unless ``OMP_NUM_THREADS`` chooses.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from evomerge.errors import EvomergeError

ALL = "cuda:all"


def parse_devices(spec: str | torch.device | list[torch.device] | None) -> list[torch.device]:
    """The devices of a device setting (None: the first GPU, or the CPU); a
    list already parsed is returned as it is."""
    if spec is None:
        return [torch.device("cuda" if torch.cuda.is_available() else "cpu")]
    if isinstance(spec, list):
        return spec
    text = str(spec).strip()
    if text == ALL:
        if not torch.cuda.is_available():
            raise EvomergeError(f"device {ALL} was given but no CUDA GPU is available; use cpu")
        return [torch.device("cuda", i) for i in range(torch.cuda.device_count())]
    parts = [p.strip() for p in text.split(",")]
    if not all(parts):
        raise EvomergeError(f"device list {text!r} has an empty entry; write it like cuda:0,cuda:1")
    out: list[torch.device] = []
    for part in parts:
        try:
            dev = torch.device(part)
        except RuntimeError:
            raise EvomergeError(
                f"unknown device {part!r}; use cpu, cuda, cuda:N or a list like cuda:0,cuda:1"
            ) from None
        if dev.type == "cuda":
            if not torch.cuda.is_available():
                raise EvomergeError(f"device {part} was given but no CUDA GPU is available; use cpu")
            if dev.index is not None and dev.index >= torch.cuda.device_count():
                raise EvomergeError(
                    f"device {part} does not exist: this process sees {torch.cuda.device_count()} GPUs; "
                    "use a lower index"
                )
        elif dev.type != "cpu":
            raise EvomergeError(f"unsupported device {part!r}; use cpu or cuda")
        out.append(dev)
    return out


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The model's list of decoder blocks: ``model.model.layers`` (Llama,
    Qwen, Mistral, ...) or else its largest ``ModuleList`` (GPT-2's
    ``transformer.h`` and the like)."""
    inner = getattr(model, "model", None)
    layers = getattr(inner, "layers", None)
    if isinstance(layers, nn.ModuleList) and len(layers):
        return layers
    lists = [m for m in model.modules() if isinstance(m, nn.ModuleList) and len(m)]
    if not lists:
        raise EvomergeError(
            f"{type(model).__name__} has no list of decoder layers to split over devices; use one device"
        )
    return max(lists, key=lambda m: sum(p.numel() for p in m.parameters()))


def _bytes(module: nn.Module) -> int:
    # parameters() yields a tied parameter once
    return sum(t.numel() * t.element_size() for t in [*module.parameters(), *module.buffers()])


def plan_layers(layer_bytes: list[int], ends_bytes: int, n_devices: int) -> list[int]:
    """The device index of each layer: contiguous runs of about equal total
    size, the first device also holding the ends (``ends_bytes``)."""
    total = ends_bytes + sum(layer_bytes)
    share = total / n_devices
    out = []
    before = ends_bytes
    for size in layer_bytes:
        middle = before + size / 2
        out.append(min(n_devices - 1, int(middle // share)) if share else 0)
        before += size
    return out


def place(model: nn.Module, devices: list[torch.device]) -> nn.Module:
    """Put ``model`` on ``devices`` (split by layers when there are several)
    and return it."""
    if len(devices) == 1:
        return model.to(devices[0])
    layers = decoder_layers(model)
    plan = plan_layers([_bytes(layer) for layer in layers], _bytes(model) - _bytes(layers), len(devices))
    for layer, index in zip(layers, plan):
        layer.to(devices[index])
        _follow_inputs(layer, devices[index])
    # Everything outside the layers goes to the first device: move the model
    # with its layer list swapped for an empty one.
    parent, attr = _owner(model, layers)
    setattr(parent, attr, nn.ModuleList())
    try:
        model.to(devices[0])
    finally:
        setattr(parent, attr, layers)
    inside = {id(m) for m in layers.modules()}
    for module in model.modules():
        if id(module) not in inside and (module._parameters or module._buffers):
            _follow_inputs(module, devices[0])
    model.evomerge_layer_plan = plan  # the device index of each layer
    return model


def _owner(model: nn.Module, target: nn.Module) -> tuple[nn.Module, str]:
    for module in model.modules():
        for name, child in module.named_children():
            if child is target:
                return module, name
    raise AssertionError("decoder_layers returned a list that is not part of the model")


def _follow_inputs(module: nn.Module, device: torch.device) -> None:
    """Move a block's tensor arguments to its device before it runs (once per module)."""
    if getattr(module, "_evomerge_device_hook", None) is not None:
        module._evomerge_device_hook.remove()

    def hook(_module, args, kwargs):
        return _to(args, device), _to(kwargs, device)

    module._evomerge_device_hook = module.register_forward_pre_hook(hook, with_kwargs=True)


def _to(value: Any, device: torch.device) -> Any:
    if isinstance(value, torch.Tensor):
        return value.to(device) if value.device != device else value
    if isinstance(value, tuple):
        moved = [_to(v, device) for v in value]
        return type(value)(*moved) if hasattr(value, "_fields") else tuple(moved)  # named tuples too
    if isinstance(value, list):
        return [_to(v, device) for v in value]
    if isinstance(value, dict):
        return {k: _to(v, device) for k, v in value.items()}
    return value


def free_cores(sample_s: float = 0.5) -> int:
    """Cores of this process's CPU set not kept busy by other work, measured
    over ``sample_s`` seconds (at least 1)."""
    import psutil

    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    busy = psutil.cpu_percent(interval=sample_s) / 100 * (os.cpu_count() or cores)
    return max(1, min(cores, round(cores - busy)))


@contextmanager
def free_core_threads(log=print) -> Iterator[int]:
    """Run the block with one torch thread per free core (see :func:`free_cores`),
    and restore the thread count after. ``OMP_NUM_THREADS`` set: left as it is."""
    before = torch.get_num_threads()
    if os.environ.get("OMP_NUM_THREADS"):
        yield before
        return
    threads = min(before, free_cores())
    if threads < before:
        log(
            f"evomerge: other work keeps {before - threads} of {before} cores busy; torch uses {threads} "
            f"thread{'s' if threads != 1 else ''} (set OMP_NUM_THREADS to choose)"
        )
    torch.set_num_threads(threads)
    try:
        yield threads
    finally:
        torch.set_num_threads(before)
