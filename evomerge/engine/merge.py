"""Writing a recipe to disk, whatever its kind: the top of the merge modules.

``merge_to_disk`` takes any recipe. A parameter-space merge is planned by
evomerge.engine.plan and streamed tensor by tensor into sharded safetensors, so
peak memory is a few tensors; a recipe with a route is assembled in memory
by evomerge.engine.routing and exported as a plain model with its scales folded.
Both end in evomerge.engine.folder, which writes the folder atomically.

Dependencies run one way: this module uses evomerge.engine.routing, which uses
evomerge.engine.plan (planning, kernel), evomerge.engine.inplace (``InPlaceMerger``) and evomerge.engine.folder;
none of them imports this one. Names callers have always imported from here
(``InPlaceMerger``, ``open_sources``, ``plan_merge``, ...) are re-exported.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Any

import torch

from evomerge.engine.devices import parse_devices
from evomerge.engine.folder import check_output_folder, pinned, write_model_folder
from evomerge.engine.inplace import InPlaceMerger
from evomerge.engine.models import SourceModel
from evomerge.engine.plan import (
    SAFETENSORS_DTYPES,
    MergePlan,
    TensorJob,
    merge_tensor,
    open_sources,
    plan_merge,
    referenced,
)
from evomerge.engine.progress import progress_bar
from evomerge.engine.recipe import Recipe
from evomerge.engine.routing import RouteMerger
from evomerge.errors import EvomergeError

__all__ = [
    "DEFAULT_SHARD_BYTES",
    "InPlaceMerger",
    "merge_to_disk",
    "model_card",
    "open_sources",
    "pinned",
    "plan_merge",
    "referenced",
]

DEFAULT_SHARD_BYTES = 5 * 1024**3


def merge_to_disk(
    recipe: Recipe,
    out_dir: Path | str,
    *,
    root: Path | str = ".",
    seed: int | None = None,
    device: str = "cpu",
    overwrite: bool = False,
    allow_outside: bool = False,
    shard_bytes: int = DEFAULT_SHARD_BYTES,
    progress: bool = True,
) -> Path:
    """Merge ``recipe`` into a Hugging Face model folder at ``out_dir``.

    A recipe with a ``route`` goes through ``evomerge.engine.routing.RouteMerger``.

    Tensors stream one at a time from memory-mapped sources into sharded
    safetensors, so peak memory is a few tensors. Everything is written into a
    hidden sibling folder that is renamed at the end: a failed merge leaves
    nothing behind.
    """
    if seed is not None:
        recipe = recipe.model_copy(update={"seed": seed})
    if recipe.route is not None:
        # A data-flow recipe is assembled in memory (merge, then route) and
        # written as a plain model with its scales folded.
        merger = RouteMerger(recipe, root=root, device=device, allow_outside=allow_outside)
        return merger.export(recipe, out_dir, overwrite=overwrite, progress=progress)
    out_dir = check_output_folder(out_dir, overwrite)
    dev = _device(device)
    sources = open_sources(recipe, root, allow_outside)
    plan = plan_merge(recipe, sources)
    recipe = pinned(plan.recipe, sources)
    return write_model_folder(
        out_dir,
        lambda tmp: _write_shards(plan, sources, tmp, dev, shard_bytes, progress),
        recipe=recipe,
        card=model_card(recipe, plan),
        config=plan.config,
        tokenizer_from=_tokenizer_folder(plan, sources),
    )


def _device(device: str) -> torch.device:
    """The one device a merge to disk streams its tensors through."""
    devices = parse_devices(device)
    if len(devices) > 1:
        raise EvomergeError(f"a merge to disk runs on one device, not {device!r}; give one, e.g. {devices[0]}")
    return devices[0]


def _tokenizer_folder(plan: MergePlan, sources: dict[str, SourceModel]) -> Path:
    """The config source's folder, or the recipe's ``tokenizer_source`` when it names a source."""
    src = sources[plan.config_source].path
    if plan.recipe.tokenizer_source not in (None, "base"):
        src = sources[plan.recipe.tokenizer_source].path if plan.recipe.tokenizer_source in sources else src
    return src


def _write_shards(
    plan: MergePlan, sources: dict[str, SourceModel], out: Path, device: torch.device, shard_bytes: int, progress: bool
) -> None:
    """Merge every tensor of ``plan`` into safetensors shards under ``out``
    (with an index when there are several), then read their headers back."""
    shards = _shard(plan.jobs, shard_bytes)
    n = len(shards)
    names = ["model.safetensors"] if n == 1 else [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]

    def load(ref: str, name: str) -> torch.Tensor:
        return sources[ref].get(name)

    bar = progress_bar(enabled=progress, total=len(plan.jobs), desc="merging", unit="tensor")
    weight_map = {}
    for fname, jobs in zip(names, shards):
        with _ShardWriter(out / fname, jobs) as writer:
            for job in jobs:
                tensor = merge_tensor(job, plan.method, load, plan.recipe.seed, device)
                _check_finite(job, tensor, load)
                writer.write(job.name, tensor)
                weight_map[job.name] = fname
                bar.update(1)
    bar.close()
    if n > 1:
        index = {"metadata": {"total_size": sum(j.nbytes for j in plan.jobs)}, "weight_map": weight_map}
        (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    # Read back every shard header through safetensors itself.
    from safetensors import safe_open

    for fname in names:
        with safe_open(str(out / fname), framework="pt") as f:
            assert set(f.keys()) == {j.name for j in plan.jobs if weight_map[j.name] == fname}


def _check_finite(job: TensorJob, tensor: torch.Tensor, load) -> None:
    """Refuse an output tensor with NaN or inf values, naming the likely cause.

    The in-place path skips this check: the search's evaluator already scores
    a model with non-finite weights as a failed candidate."""
    if bool(torch.isfinite(tensor).all()):
        return
    what = f"merged tensor {job.name} has NaN or inf values"
    for ref, name in job.inputs:
        source = load(ref, name)
        if not bool(torch.isfinite(source).all()):
            raise EvomergeError(f"{what}: source {ref} already has them in {name}; repair or re-download that model")
        if not bool(torch.isfinite(source.to(job.compute_dtype)).all()):
            raise EvomergeError(
                f"{what}: {name} of {ref} exceeds the range of {_dtype_name(job.compute_dtype)}; "
                "set the recipe's dtype to float32"
            )
    dtypes = dict.fromkeys(_dtype_name(d) for d in (job.compute_dtype, job.out_dtype))
    raise EvomergeError(
        f"{what} although its sources are finite: the parameters for it (a weight, lambda or scale) push values "
        f"past the range of {' and '.join(dtypes)}; use smaller values"
    )


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _shard(jobs: list[TensorJob], limit: int) -> list[list[TensorJob]]:
    shards: list[list[TensorJob]] = [[]]
    size = 0
    for job in jobs:
        if shards[-1] and size + job.nbytes > limit:
            shards.append([])
            size = 0
        shards[-1].append(job)
        size += job.nbytes
    return shards


class _ShardWriter:
    """Writes one safetensors file tensor by tensor.

    The safetensors library only serialises whole dicts of tensors in memory.
    Shapes and dtypes are known from the plan before any tensor is merged, so
    the header can be written first and each tensor streamed after it: peak
    memory stays at one tensor instead of one shard. The file is read back
    with ``safetensors.safe_open`` once written.
    """

    def __init__(self, path: Path, jobs: list[TensorJob]):
        header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
        offset = 0
        self._expected = []
        for job in jobs:
            header[job.name] = {
                "dtype": SAFETENSORS_DTYPES[job.out_dtype],
                "shape": list(job.shape),
                "data_offsets": [offset, offset + job.nbytes],
            }
            offset += job.nbytes
            self._expected.append((job.name, job.shape, job.out_dtype))
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)
        self._f = open(path, "wb")
        self._f.write(struct.pack("<Q", len(raw)) + raw)
        self._i = 0

    def write(self, name: str, tensor: torch.Tensor) -> None:
        exp_name, shape, dtype = self._expected[self._i]
        assert (name, tuple(tensor.shape), tensor.dtype) == (exp_name, shape, dtype), (name, tensor.shape)
        data = tensor.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8).numpy()
        self._f.write(memoryview(data))
        self._i += 1

    def __enter__(self) -> _ShardWriter:
        return self

    def __exit__(self, *exc) -> None:
        self._f.close()
        if exc[0] is None:
            assert self._i == len(self._expected)


def model_card(recipe: Recipe, plan: MergePlan) -> str:
    """The README of a plain merge: its method, sources and their pins, and the recipe."""
    models = [s.model for s in recipe.sources] or sorted({r for j in plan.jobs for r, _ in j.inputs})
    lines = [
        "---",
        "library_name: transformers",
        "tags: [merge, evomerge]",
        "---",
        f"# Merged model ({recipe.method})",
        "",
        f"Made with [evomerge](https://github.com/evomerge/evomerge) using **{recipe.method}** "
        f"({plan.method.reference or 'mergekit semantics'}).",
        "",
        "## Sources",
        "",
    ]
    for s in recipe.sources or []:
        pins = ", ".join(f"`{k}` sha256 `{v}`" for k, v in (s.sha256 or {}).items())
        lines.append(f"- `{s.model}`" + (f" ({pins})" if pins else ""))
    if not recipe.sources:
        lines += [f"- `{m}`" for m in models]
    if recipe.base_model:
        lines += ["", f"Base model: `{recipe.base_model}`"]
    lines += [
        "",
        f"Recipe fingerprint: `{recipe.fingerprint()}`, seed {recipe.seed}.",
        "",
        "## Recipe",
        "",
        "```yaml",
        recipe.to_yaml().rstrip(),
        "```",
        "",
        "Rebuild it with `evomerge merge recipe.yaml OUT_DIR`.",
        "",
    ]
    return "\n".join(lines)
