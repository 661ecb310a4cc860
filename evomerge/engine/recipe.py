"""The Recipe: a frozen, validated description of one merge.

A recipe names its sources (local folders or HF ids, optionally pinned by
sha256 per weight file), an optional base model, a merge method, parameters,
dtype and seed. Parameters may be scalars, gradients (lists interpolated over
layers) or filtered overrides, with mergekit's semantics. mergekit YAML configs
load as recipes unchanged.

A recipe holds no behaviour beyond validation, YAML round-trips and a stable
fingerprint; ``merge.py`` materialises it.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, Field, ValidationError, model_validator

from evomerge.errors import EvomergeError, field_error
from evomerge.schema import Strict

Scalar = bool | int | float | str
# A route's name for the recipe's own merge, as a routing source (a hybrid).
MERGED = "merge"


class Conditional(Strict):
    """A value that applies to tensors whose name contains ``filter``."""

    value: Scalar | list[Scalar]
    filter: str | None = None


Setting = Scalar | list[Scalar] | Conditional | list[Conditional]
Settings = dict[str, Setting]

DTYPES = ("float32", "float16", "bfloat16", "float64")


class Source(Strict):
    """One input model. ``model`` is a folder (relative to the recipe's
    folder) or a Hugging Face id; ``sha256`` pins weight files by name."""

    model: str
    parameters: Settings | None = None
    sha256: dict[str, str] | None = None


class SliceSource(Strict):
    model: str
    layer_range: tuple[int, int]
    parameters: Settings | None = None


class Slice(Strict):
    """A run of output layers, merged from equally long layer ranges."""

    sources: list[SliceSource]
    base_model: str | None = None
    parameters: Settings | None = None


class RouteStep(Strict):
    """One layer of a route: ``layer`` of ``model``, its input times ``scale``.
    ``model`` is a source, or ``merge`` for the recipe's own merge (a hybrid)."""

    model: str
    layer: int = Field(ge=0)
    scale: float = 1.0


class Route(Strict):
    """A data-flow path through the layers of several models.

    The embeddings come from ``embed`` (default: the first step's model), the
    final norm and LM head from ``head`` (default: the last step's model), as
    in a mergekit passthrough merge. Models with tied embeddings take the head
    from ``embed``.
    """

    layers: list[RouteStep]
    embed: str | None = None
    head: str | None = None
    # Models the route runs that are not inputs of the recipe's merge (a
    # hybrid on a fixed merge), pinned like sources.
    models: list[Source] | None = None


class Recipe(Strict):
    """A merge: method, sources, parameters, dtype and seed.

    Either ``sources`` lists the models merged over all their layers
    (mergekit's ``models:``), or ``slices`` builds the output layer by layer
    (then ``sources`` may still list models to pin their sha256).
    ``route`` makes it a data-flow recipe: the merge (if ``method`` is set)
    happens first and is the routing source ``merge``; with no ``method``,
    ``sources`` lists the routed models.
    ``metadata`` (scores, versions, provenance) is not part of the fingerprint.
    """

    method: str | None = None
    sources: list[Source] = Field(default_factory=list)
    base_model: str | None = None
    slices: list[Slice] | None = None
    parameters: Settings | None = None
    dtype: str | None = None
    out_dtype: str | None = None
    seed: int = 0
    tokenizer_source: str | None = None
    route: Route | None = None
    metadata: dict[str, Any] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _check(self) -> Recipe:
        from evomerge.engine.methods import get_method

        if self.route is not None:
            self._check_route()
        if self.method is None:
            if self.route is None:
                raise EvomergeError("the recipe has no merge method; set 'method' (or mergekit's 'merge_method')")
            if self.slices or self.base_model or self.parameters or any(s.parameters for s in self.sources):
                raise EvomergeError(
                    "a route-only recipe (no method) takes no slices, base_model or parameters; "
                    "set a method to merge first"
                )
            if not self.sources:
                raise EvomergeError("the route's models must be listed under 'sources'; add them")
            return self
        method = get_method(self.method)
        for field_name in ("dtype", "out_dtype"):
            value = getattr(self, field_name)
            if value is not None and value not in DTYPES:
                raise EvomergeError(f"{field_name} {value!r} is not supported; use one of {', '.join(DTYPES)}")
        if not self.sources and not self.slices:
            raise EvomergeError("the recipe has no models; list them under 'sources' (or mergekit's 'models')")
        if self.slices:
            if any(s.parameters for s in self.sources):
                raise EvomergeError(
                    "a recipe with slices takes per-model parameters inside each slice, not under sources; move them"
                )
            for i, sl in enumerate(self.slices):
                lengths = {b - a for a, b in (s.layer_range for s in sl.sources)}
                if not sl.sources or len(lengths) != 1 or min(lengths) <= 0:
                    raise EvomergeError(
                        f"slice {i} needs sources with equally long, non-empty layer ranges; fix layer_range"
                    )
        for where, settings in self._all_settings():
            for name, setting in (settings or {}).items():
                if name not in method.param_names:
                    known = ", ".join(method.param_names) or "none"
                    raise EvomergeError(
                        f"unknown parameter {name!r} for method {self.method!r} ({where}); its parameters are: {known}"
                    )
                for leaf in _leaves(setting):
                    method.param(name).validate(leaf, where)
        return self

    def _check_route(self) -> None:
        route = self.route
        if not route.layers:
            raise EvomergeError("the route is empty; a route needs at least one layer under 'route.layers'")
        names = {s.model for s in self.sources} | {s.model for s in route.models or []}
        if self.method is not None:
            names.add(MERGED)
        for i, step in enumerate(route.layers):
            if step.model not in names:
                hint = "" if self.method is not None else f" ('{MERGED}' needs a method)"
                raise EvomergeError(
                    f"route step {i} uses model {step.model!r}, which is not among the recipe's sources{hint}; "
                    f"use one of {', '.join(sorted(names))}"
                )
            if not (step.scale > 0 and step.scale < float("inf")):
                raise EvomergeError(f"route step {i} has scale {step.scale}; scales must be positive and finite")
        for key in ("embed", "head"):
            value = getattr(route, key)
            if value is not None and value not in names:
                raise EvomergeError(
                    f"route {key} {value!r} is not among the recipe's sources; use one of {', '.join(sorted(names))}"
                )

    def with_refs(self, fn) -> Recipe:
        """The recipe with every model reference ``r`` replaced by ``fn(r)``
        (the routing source ``merge`` kept)."""

        def f(ref):
            return ref if ref is None or ref == MERGED else fn(ref)

        update: dict[str, Any] = {
            "sources": [s.model_copy(update={"model": f(s.model)}) for s in self.sources],
            "base_model": f(self.base_model),
        }
        if self.slices:
            update["slices"] = [
                sl.model_copy(
                    update={
                        "base_model": f(sl.base_model),
                        "sources": [s.model_copy(update={"model": f(s.model)}) for s in sl.sources],
                    }
                )
                for sl in self.slices
            ]
        if self.route is not None:
            steps = [s.model_copy(update={"model": f(s.model)}) for s in self.route.layers]
            extra = [s.model_copy(update={"model": f(s.model)}) for s in self.route.models or []] or None
            update["route"] = Route(layers=steps, embed=f(self.route.embed), head=f(self.route.head), models=extra)
        return Recipe.model_validate({**self.model_dump(), **{k: _dump(v) for k, v in update.items()}})

    def merge_part(self) -> Recipe | None:
        """The recipe's parameter-space merge without its route (None if it has none)."""
        if self.method is None:
            return None
        return self.model_copy(update={"route": None})

    def _all_settings(self):
        yield "parameters", self.parameters
        for s in self.sources:
            yield f"model {s.model}", s.parameters
        for i, sl in enumerate(self.slices or []):
            yield f"slice {i}", sl.parameters
            for s in sl.sources:
                yield f"slice {i} model {s.model}", s.parameters

    # -- serialisation -----------------------------------------------------

    def canonical(self) -> dict:
        """The recipe as plain data, without metadata and unset fields, with
        every parameter number as a float (weight 1 and 1.0 are one recipe)."""
        data = self.model_dump(mode="json", exclude={"metadata"}, exclude_none=True)
        for key in ("parameters",):
            if key in data:
                data[key] = _floats(data[key])
        for group in [data.get("sources", [])] + [sl["sources"] for sl in data.get("slices", [])]:
            for s in group:
                if "parameters" in s:
                    s["parameters"] = _floats(s["parameters"])
        for sl in data.get("slices", []):
            if "parameters" in sl:
                sl["parameters"] = _floats(sl["parameters"])
        return data

    def fingerprint(self) -> str:
        """sha256 of the canonical JSON form: equal recipes, equal fingerprints."""
        text = json.dumps(self.canonical(), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(text.encode()).hexdigest()

    def to_yaml(self) -> str:
        data = self.model_dump(mode="json", exclude_none=True)
        if not data.get("metadata"):
            data.pop("metadata", None)
        return yaml.safe_dump(data, sort_keys=False)

    def to_mergekit_yaml(self) -> str:
        """The same merge as a mergekit config (sha256, seed and metadata dropped)."""
        if self.route is not None:
            raise EvomergeError("a routed recipe has no direct mergekit form; export it with --format mergekit")
        plain = self.model_dump(mode="json", exclude_none=True)
        data: dict[str, Any] = {"merge_method": self.method}
        if self.slices:
            data["slices"] = plain["slices"]
        else:
            data["models"] = [{k: v for k, v in s.items() if k != "sha256"} for s in plain["sources"]]
        for key in ("base_model", "parameters", "dtype", "out_dtype", "tokenizer_source"):
            if key in plain:
                data[key] = plain[key]
        return yaml.safe_dump(data, sort_keys=False)

    @classmethod
    def from_dict(cls, data: Any, where: str = "recipe") -> Recipe:
        """Build from evomerge or mergekit data (detected by ``merge_method``)."""
        if not isinstance(data, dict):
            raise EvomergeError(f"{where} is not a YAML mapping; write it as 'key: value' lines")
        if "merge_method" in data:
            data = _from_mergekit(data, where)
        try:
            return cls.model_validate(data)
        except ValidationError as e:
            raise field_error(where, e) from None


def _dump(value: Any) -> Any:
    if isinstance(value, BaseModel):
        return value.model_dump()
    if isinstance(value, list):
        return [_dump(v) for v in value]
    return value


def _floats(value: Any) -> Any:
    """Integers inside plain parameter data as floats (booleans kept)."""
    if isinstance(value, dict):
        return {k: _floats(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_floats(v) for v in value]
    if isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    return value


def _leaves(setting: Any):
    """Every scalar inside a setting (gradient entries, filtered values)."""
    if isinstance(setting, Conditional):
        yield from _leaves(setting.value)
    elif isinstance(setting, list):
        for item in setting:
            yield from _leaves(item)
    else:
        yield setting


_MERGEKIT_KEYS = {
    "models",
    "slices",
    "merge_method",
    "base_model",
    "parameters",
    "dtype",
    "out_dtype",
    "tokenizer_source",
}


def _from_mergekit(data: dict, where: str) -> dict:
    unsupported = set(data) - _MERGEKIT_KEYS
    if unsupported:
        raise EvomergeError(
            f"{where}: mergekit option(s) {', '.join(sorted(unsupported))} are not supported by evomerge; remove them"
        )
    if data.get("models") is not None and data.get("slices") is not None:
        raise EvomergeError(f"{where}: give either 'models' or 'slices', not both")
    refs = [m.get("model") for m in data.get("models") or [] if isinstance(m, dict)]
    refs += [s.get("model") for sl in data.get("slices") or [] for s in sl.get("sources", [])]
    for ref in refs + [data.get("base_model")]:
        if isinstance(ref, str) and "+" in ref:
            raise EvomergeError(f"{where}: LoRA model references ({ref!r}) are not supported; merge the LoRA first")
    out = {k: v for k, v in data.items() if k not in ("models", "merge_method")}
    out["method"] = data["merge_method"]
    out["sources"] = data.get("models") or []
    return out


def load_recipe(path: str | Path) -> Recipe:
    """Read a recipe (evomerge or mergekit YAML) from a file."""
    path = Path(path)
    if path.is_dir():
        inside = path / "recipe.yaml"
        hint = f", e.g. {inside}" if inside.is_file() else ""
        raise EvomergeError(f"recipe {path} is a folder, not a file; pass the recipe YAML file{hint}")
    if not path.is_file():
        raise EvomergeError(f"recipe file {path} does not exist; check the path")
    try:
        data = yaml.safe_load(path.read_text())
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise EvomergeError(f"recipe {path} is not valid YAML ({first}); fix the syntax") from None
    return Recipe.from_dict(data, where=str(path))


def evaluate_setting(setting: Setting, tensor_name: str, t: float, validate) -> Any:
    """Resolve one setting for one tensor at relative depth ``t`` in [0, 1].

    Filters: the first conditional whose filter is absent, ``*`` or a
    substring of the tensor name wins; if none matches, return None so that a
    lower-precedence setting applies. Gradients: numeric lists interpolate
    linearly over ``t``; lists of booleans or strings pick a step.
    """
    if isinstance(setting, Conditional):
        setting = [setting]
    if not isinstance(setting, list):
        return validate(setting)
    if not setting:
        return None
    if isinstance(setting[0], Conditional):
        for cond in setting:
            if cond.filter in (None, "*") or (tensor_name and cond.filter in tensor_name):
                return evaluate_setting(cond.value, tensor_name, t, validate)
        return None
    values = [validate(v) for v in setting]
    if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values):
        return values[int(t * (len(values) - 1))]
    pos = t * (len(values) - 1)
    i0 = int(pos)
    i1 = min(len(values) - 1, i0 + 1)
    frac = pos - i0
    return validate((1 - frac) * values[i0] + frac * values[i1])


def gradient_lengths(setting: Setting) -> list[int]:
    """Lengths of the gradient lists inside a setting (for depth checks)."""
    if isinstance(setting, Conditional):
        return gradient_lengths(setting.value)
    if isinstance(setting, list):
        if setting and isinstance(setting[0], Conditional):
            return [n for c in setting for n in gradient_lengths(c)]
        return [len(setting)]
    return []
