"""A parameter-space merge: its plan, its per-tensor kernel, and the merger
that applies it to a live model.

``plan_merge`` resolves a recipe (no route) into a ``MergePlan``: which
output tensor comes from which input tensors, with which parameters. Every
user error surfaces there, before a tensor is read. ``merge_tensor`` merges
one output tensor of the plan. ``InPlaceMerger`` runs the plan into a
resident model's parameters for search; evomerge.engine.merge streams the same plan
to disk, so both give bit-identical tensors. evomerge.engine.routing builds its
hybrids on ``InPlaceMerger``.

    recipe --plan_merge--> MergePlan --merge_tensor per job--> tensors
                                         |-> streamed into safetensors shards (evomerge.engine.merge)
                                         '-> copied into a live model's parameters (InPlaceMerger)
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from evomerge.engine.devices import parse_devices, place
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
    compute = torch_dtype(recipe.dtype)
    out_dtype = torch_dtype(recipe.out_dtype)

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

    jobs: list[TensorJob] = []

    def add(out_name: str, sl: Slice, in_names: list[str], t: float) -> None:
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
                _resolve(method, in_names[i], _scopes(recipe, sl, refs[i]), t, f"{refs[i]} {in_names[i]}", p)
                for i in idx
            ]
        if method.check is not None:
            method.check(out_name, params)
        first = sources[refs[0]]
        dtypes = [_TORCH_OF_ST.get(sources[r].dtype_name(n), torch.float32) for r, n in zip(refs, in_names)]
        c = compute or _promote(dtypes)
        jobs.append(
            TensorJob(
                out_name, list(zip(refs, in_names)), base_index, params, first.shape(in_names[0]), c, out_dtype or c
            )
        )

    first_slice, last_slice = slices[0], slices[-1]
    head = sources[first_slice.sources[0].model]
    tail = sources[last_slice.sources[-1].model]
    for name in head.non_layer_names():
        if is_pre_layer(name):
            add(name, first_slice, [name] * len(first_slice.sources), 0.0)

    layer_origin: list[tuple[str, int]] = []
    out_layer = 0
    for sl in slices:
        n = sl.sources[0].layer_range[1] - sl.sources[0].layer_range[0]
        for k in range(n):
            t = k / (n - 1) if n > 1 else 1.0
            lead = sl.sources[0]
            layer_origin.append((lead.model, lead.layer_range[0] + k))
            for prefix, rest in sources[lead.model].layer_names(lead.layer_range[0] + k):
                in_names = []
                for s in sl.sources:
                    src_prefix = _layer_prefix(sources[s.model]) or prefix
                    in_names.append(f"{src_prefix}.{s.layer_range[0] + k}.{rest}")
                add(f"{prefix}.{out_layer}.{rest}", sl, in_names, t)
            out_layer += 1

    for name in tail.non_layer_names():
        if not is_pre_layer(name):
            add(name, last_slice, [name] * len(last_slice.sources), 0.0)

    config_source = recipe.base_model or first_slice.sources[0].model
    config = _output_config(sources, config_source, layer_origin, recipe.out_dtype or recipe.dtype)
    return MergePlan(recipe, method, jobs, config, config_source, layer_origin)


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


# -- in place --------------------------------------------------------------------


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
    ):
        self.devices = parse_devices(device)
        self.root = Path(root)
        self.sources = open_sources(template, root, allow_outside)
        plan = plan_merge(template, self.sources)
        self.config = plan.config
        self._cache: dict = {}
        self.model = model if model is not None else build_model(plan.config, plan.jobs[0].out_dtype, self.devices)
        named = dict(self.model.named_parameters(remove_duplicate=False))
        named.update(dict(self.model.named_buffers()))
        missing = [j.name for j in plan.jobs if j.name not in named]
        if missing:
            raise EvomergeError(
                f"the live model has no parameter {missing[0]}; its architecture does not match the sources"
            )
        self._targets = {j.name: named[j.name] for j in plan.jobs}
        # Each source tensor sits where the parameter it merges into does
        # (one device, or the layer's device when the model is split).
        self._tensors: dict[tuple[str, str], torch.Tensor] = {}
        for job in plan.jobs:
            for ref, name in job.inputs:
                key = (ref, name)
                if key not in self._tensors:
                    where = self._targets[job.name].device
                    self._tensors[key] = self.sources[ref].get(name).to(where, job.compute_dtype)
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
        for job in plan.jobs:
            target = self._targets[job.name]
            merge_tensor(job, plan.method, self._load, recipe.seed, target.device, self._cache, True, self.fuse, target)
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
