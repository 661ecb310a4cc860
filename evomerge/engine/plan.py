"""A parameter-space merge: its plan and its per-tensor kernel.

``plan_merge`` resolves a recipe (no route) into a ``MergePlan``: which
output tensor comes from which input tensors, with which parameters. Every
user error surfaces there, before a tensor is read. ``merge_tensor`` merges
one output tensor of the plan. ``evomerge.engine.inplace.InPlaceMerger``
runs the plan into a resident model's parameters for search;
evomerge.engine.merge streams the same plan to disk, so both give
bit-identical tensors.

    recipe --plan_merge--> MergePlan --merge_tensor per job--> tensors
                                         |-> streamed into safetensors shards (evomerge.engine.merge)
                                         '-> copied into a live model's parameters (InPlaceMerger)
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import torch

from evomerge.engine.methods import MergeMethod, TensorInputs, get_method
from evomerge.engine.models import SourceModel, is_pre_layer, resolve_model_path, split_layer_name
from evomerge.engine.recipe import Recipe, Setting, Slice, SliceSource, evaluate_setting, gradient_lengths
from evomerge.errors import EvomergeError

_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16, "float64": torch.float64}
# safetensors' names for the dtypes a merge can produce.
SAFETENSORS_DTYPES = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16", torch.float64: "F64"}
_TORCH_OF_ST = {v: k for k, v in SAFETENSORS_DTYPES.items()}
FUSE_MIN_PARAMS = 20_000_000


@dataclass
class TensorJob:
    """One output tensor: its inputs, in order, and its resolved parameters."""

    name: str
    inputs: list[tuple[str, str]]  # (model reference, input tensor name)
    base_index: int | None
    params: dict[str, Any]
    shape: tuple[int, ...]
    compute_dtype: torch.dtype
    out_dtype: torch.dtype

    @property
    def nbytes(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n * self.out_dtype.itemsize


@dataclass
class MergePlan:
    recipe: Recipe
    method: MergeMethod
    jobs: list[TensorJob]
    config: dict  # the output model's config.json
    config_source: str  # model reference whose config and tokenizer the output takes
    layer_origin: list[tuple[str, int]] = field(default_factory=list)  # per output layer


# -- planning ------------------------------------------------------------------


def referenced(recipe: Recipe) -> list[str]:
    """Every model reference in the recipe, in first-use order, once each."""
    refs = [s.model for s in recipe.sources]
    refs += [s.model for s in recipe.route.models or []] if recipe.route else []
    refs += [s.model for sl in recipe.slices or [] for s in sl.sources]
    refs += [r for r in [recipe.base_model] + [sl.base_model for sl in recipe.slices or []] if r]
    return list(dict.fromkeys(refs))


def open_sources(recipe: Recipe, root: Path | str = ".", allow_outside: bool = False) -> dict[str, SourceModel]:
    """Open every model the recipe references, keyed by its reference string."""
    root = Path(root)
    pins = {s.model: s.sha256 for s in [*recipe.sources, *((recipe.route.models or []) if recipe.route else [])]}
    return {
        ref: SourceModel(resolve_model_path(ref, root, allow_outside), ref=ref, sha256=pins.get(ref))
        for ref in referenced(recipe)
    }


def _normalized_slices(recipe: Recipe, sources: dict[str, SourceModel]) -> list[Slice]:
    """mergekit's normalisation: a models-style merge is one slice over all
    layers; a base model not listed among the models is appended last."""
    if recipe.slices:
        return recipe.slices
    refs = [s.model for s in recipe.sources]
    params = {s.model: s.parameters for s in recipe.sources}
    if recipe.base_model and recipe.base_model not in refs:
        refs.append(recipe.base_model)
    _check_compatible([sources[r] for r in refs])
    n = sources[refs[0]].num_layers
    return [Slice(sources=[SliceSource(model=r, layer_range=(0, n), parameters=params.get(r)) for r in refs])]


def _check_compatible(models: list[SourceModel]) -> None:
    first = models[0]
    for other in models[1:]:
        for what, a, b in (
            ("architecture", first.architecture, other.architecture),
            ("layer count", first.num_layers, other.num_layers),
            ("vocab size", first.config.get("vocab_size"), other.config.get("vocab_size")),
        ):
            if a != b:
                raise EvomergeError(
                    f"models {first.ref} and {other.ref} differ in {what} ({a} vs {b}); "
                    "merge only fine-tunes of the same base model"
                )
        missing = set(first.names) ^ set(other.names)
        if missing:
            name = sorted(missing)[0]
            lacks = other.ref if first.has(name) else first.ref
            raise EvomergeError(f"model {lacks} lacks tensor {name}; merge only models of the same architecture")
        for name in first.names:
            if first.shape(name) != other.shape(name):
                raise EvomergeError(
                    f"tensor {name} has shape {first.shape(name)} in {first.ref} but {other.shape(name)} in "
                    f"{other.ref}; merge only models of the same architecture"
                )


def _scopes(recipe: Recipe, sl: Slice, ref: str | None) -> list[dict[str, Setting] | None]:
    """Settings in descending precedence: this model in this slice, the slice, the recipe."""
    out: list[dict[str, Setting] | None] = []
    if ref is not None:
        out += [s.parameters for s in sl.sources if s.model == ref]
    return out + [sl.parameters, recipe.parameters]


def _resolve(method: MergeMethod, name: str, scopes, t: float, where: str, param) -> Any:
    for scope in scopes:
        if scope and param.name in scope:
            value = evaluate_setting(scope[param.name], name, t, lambda v: param.validate(v, where))
            if value is not None:
                return value
    if param.required:
        raise EvomergeError(f"method {method.name!r} needs parameter {param.name!r} for {where}; add it to the recipe")
    return param.default


def _check_gradients(recipe: Recipe, slices: list[Slice]) -> None:
    longest = max(sl.sources[0].layer_range[1] - sl.sources[0].layer_range[0] for sl in slices)
    checks = [(recipe.parameters, longest, "parameters")]
    for i, sl in enumerate(slices):
        n = sl.sources[0].layer_range[1] - sl.sources[0].layer_range[0]
        checks.append((sl.parameters, n, f"slice {i}"))
        checks += [(s.parameters, n, f"model {s.model}") for s in sl.sources]
    for settings, n, where in checks:
        for pname, setting in (settings or {}).items():
            for length in gradient_lengths(setting):
                if length > n:
                    raise EvomergeError(
                        f"gradient for {pname!r} ({where}) has {length} values but the merge has only {n} layers; "
                        f"give at most {n} values"
                    )


def torch_dtype(name: str | None) -> torch.dtype | None:
    """The torch dtype a recipe names (``float32``, ``bfloat16``, ...); None for none."""
    return _DTYPES[name] if name else None


def plan_merge(recipe: Recipe, sources: dict[str, SourceModel]) -> MergePlan:
    """Resolve every output tensor's inputs and parameters, validating as it goes.

    All user errors surface here, before any tensor is read or written.
    """
    method = get_method(recipe.method)
    slices = _normalized_slices(recipe, sources)
    _check_gradients(recipe, slices)
    _check_slices(recipe, method, slices, sources)
    job = partial(_tensor_job, recipe, method, sources, torch_dtype(recipe.dtype), torch_dtype(recipe.out_dtype))

    first_slice, last_slice = slices[0], slices[-1]
    head = sources[first_slice.sources[0].model]
    tail = sources[last_slice.sources[-1].model]
    jobs = [
        job(name, first_slice, [name] * len(first_slice.sources), 0.0)
        for name in head.non_layer_names()
        if is_pre_layer(name)
    ]
    layer_origin: list[tuple[str, int]] = []
    for sl in slices:
        _add_layer_jobs(sl, sources, layer_origin, jobs, job)
    jobs += [
        job(name, last_slice, [name] * len(last_slice.sources), 0.0)
        for name in tail.non_layer_names()
        if not is_pre_layer(name)
    ]

    config_source = recipe.base_model or first_slice.sources[0].model
    config = _output_config(sources, config_source, layer_origin, recipe.out_dtype or recipe.dtype)
    return MergePlan(recipe, method, jobs, config, config_source, layer_origin)


def _check_slices(recipe: Recipe, method: MergeMethod, slices: list[Slice], sources: dict[str, SourceModel]) -> None:
    """Each slice has its base among its models, as many models as the method
    takes, and layer ranges inside its models."""
    for i, sl in enumerate(slices):
        base = sl.base_model or recipe.base_model
        refs = [s.model for s in sl.sources]
        if base and method.base != "ignored" and base not in refs:
            raise EvomergeError(f"base model {base} is not among the models of slice {i}; add it to that slice")
        method.check_inputs(len(refs), bool(base and base in refs), f"slice {i}")
        for s in sl.sources:
            n = sources[s.model].num_layers
            if not 0 <= s.layer_range[0] < s.layer_range[1] <= n:
                raise EvomergeError(
                    f"layer_range {list(s.layer_range)} of {s.model} is outside its {n} layers; fix the slice"
                )


def _add_layer_jobs(sl: Slice, sources: dict[str, SourceModel], layer_origin: list, jobs: list, job) -> None:
    """Append the jobs of one slice's layers (numbered on from ``layer_origin``,
    which records each output layer's source layer), at their gradient
    positions ``t`` from 0 at the slice's first layer to 1 at its last."""
    count = sl.sources[0].layer_range[1] - sl.sources[0].layer_range[0]
    lead = sl.sources[0]
    for k in range(count):
        t = k / (count - 1) if count > 1 else 1.0
        out_layer = len(layer_origin)
        layer_origin.append((lead.model, lead.layer_range[0] + k))
        for prefix, rest in sources[lead.model].layer_names(lead.layer_range[0] + k):
            in_names = []
            for s in sl.sources:
                src_prefix = _layer_prefix(sources[s.model]) or prefix
                in_names.append(f"{src_prefix}.{s.layer_range[0] + k}.{rest}")
            jobs.append(job(f"{prefix}.{out_layer}.{rest}", sl, in_names, t))


def _tensor_job(
    recipe: Recipe,
    method: MergeMethod,
    sources: dict[str, SourceModel],
    compute,
    out_dtype,
    out_name: str,
    sl: Slice,
    in_names: list[str],
    t: float,
) -> TensorJob:
    """One output tensor's job: its inputs, its parameters resolved at
    gradient position ``t``, and its compute and output dtypes (without a
    recipe dtype, the promotion of its inputs')."""
    refs = [s.model for s in sl.sources]
    base = sl.base_model or recipe.base_model
    base_index = refs.index(base) if base and method.base != "ignored" and base in refs else None
    params: dict[str, Any] = {}
    for p in method.params:
        if p.scope == "shared":
            params[p.name] = _resolve(method, out_name, _scopes(recipe, sl, None), t, out_name, p)
            continue
        idx = [i for i in range(len(refs)) if p.scope == "per_input" or i != base_index]
        params[p.name] = [
            _resolve(method, in_names[i], _scopes(recipe, sl, refs[i]), t, f"{refs[i]} {in_names[i]}", p) for i in idx
        ]
    if method.check is not None:
        method.check(out_name, params)
    first = sources[refs[0]]
    dtypes = [_TORCH_OF_ST.get(sources[r].dtype_name(n), torch.float32) for r, n in zip(refs, in_names)]
    dtype = compute or _promote(dtypes)
    inputs = list(zip(refs, in_names))
    return TensorJob(out_name, inputs, base_index, params, first.shape(in_names[0]), dtype, out_dtype or dtype)


def _layer_prefix(model: SourceModel) -> str | None:
    for name in model.names:
        parts = split_layer_name(name)
        if parts:
            return parts[0]
    return None


def _promote(dtypes: Iterable[torch.dtype]) -> torch.dtype:
    out = None
    for d in dtypes:
        out = d if out is None else torch.promote_types(out, d)
    return out


def _output_config(
    sources: dict[str, SourceModel], ref: str, layer_origin: list[tuple[str, int]], dtype: str | None
) -> dict:
    cfg = json.loads(json.dumps(sources[ref].config))
    n_src = sources[ref].num_layers
    for key, value in list(cfg.items()):
        # Per-layer lists (e.g. layer_types) follow the layers they describe.
        if isinstance(value, list) and len(value) == n_src and n_src != len(layer_origin):
            cfg[key] = [sources[m].config.get(key, value)[i] for m, i in layer_origin]
    if "num_hidden_layers" in cfg or "n_layer" not in cfg:
        cfg["num_hidden_layers"] = len(layer_origin)
    else:
        cfg["n_layer"] = len(layer_origin)
    if dtype:
        cfg["dtype"] = dtype
        cfg.pop("torch_dtype", None)
    return cfg


# -- the per-tensor kernel -------------------------------------------------------


def merge_tensor(
    job: TensorJob,
    method: MergeMethod,
    load: Callable[[str, str], torch.Tensor],
    seed: int,
    device: torch.device,
    cache: dict | None = None,
    resident: bool = False,
    fuse: bool = False,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Merge one output tensor from the inputs ``load(ref, name)`` returns,
    into ``out`` when given (saving a copy for methods that write there)."""
    tensors = [load(ref, name).to(device=device, dtype=job.compute_dtype) for ref, name in job.inputs]
    x = TensorInputs(job.name, tensors, job.base_index, seed, cache, job.inputs, resident, fuse)
    x.out = out
    result = method.fn(x, job.params)
    if out is None:
        return result.to(job.out_dtype)
    if result is not out:
        out.copy_(result)
    return out
