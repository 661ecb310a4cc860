"""SearchSpace: the only code that maps optimizer points to recipes and back.

A space file names the merge method(s), which of their parameters are
searched and at what granularity, and which are fixed. Parameter names, types
and default ranges come from the methods' own declarations
(``evomerge.methods``); a space may only narrow a range, never restate it.

Granularity of a searched parameter (``per``):

- ``global``: one value for the whole model;
- ``layer``: one value per layer;
- ``block``: one value per ``block`` consecutive layers;
- ``gradient``: ``points`` values spread over the depth and interpolated
  between, as mergekit gradients are.

``groups`` (e.g. ``[self_attn, mlp]``) adds a value per module group: tensors
whose name contains the group's filter, and a last group for every other
tensor (embeddings, norms, head). Per-model parameters (weight, density, ...)
get values for each model.

Points come in two forms: a vector ``x`` in the unit cube (pycma), and a dict
of named values in the parameters' own units (Optuna). Decoded values are
rounded to ``DIGITS`` decimals, so that a point and its recipe round-trip and
equal recipes share a fingerprint (and so a cache entry).
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError, field_validator

from evomerge.errors import EvomergeError, field_error
from evomerge.methods import METHODS, MergeMethod, get_method
from evomerge.recipe import MERGED, Conditional, Recipe, Route, RouteStep, Source

DIGITS = 6
PRESETS = Path(__file__).resolve().parent.parent / "search_spaces"
METHOD_GENE = "method"


class _Strict(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class SearchedParam(_Strict):
    per: Literal["global", "layer", "block", "gradient"] = "global"
    block: int | None = None
    points: int | None = None
    groups: list[str] | None = None
    bounds: tuple[float, float] | None = None

    @field_validator("block", "points")
    @classmethod
    def _positive(cls, v):
        if v is not None and v < 1:
            raise ValueError("must be at least 1")
        return v


class PathSpec(_Strict):
    """The constrained routing variant: a path of fixed ``depth`` whose
    position k runs layer k (scaled to each model's depth) of a chosen model."""

    depth: int | None = None  # default: the first routing source's depth

    @field_validator("depth")
    @classmethod
    def _positive(cls, v):
        if v is not None and v < 1:
            raise ValueError("must be at least 1")
        return v


class RoutingSpec(_Strict):
    """Layer routing (the data-flow space of Akiba et al., 2024).

    The layers of the ``sources`` (M models; default: the config's models,
    after ``merge`` in a hybrid), repeated ``repeats`` times, are T slots in
    order; each slot is included or skipped. ``scale`` multiplies each
    included layer's input: one value per slot, one per transition between
    models (the paper's M x M matrix; the first step is not scaled), or
    none. ``first``/``last: forced`` always include the first and the last
    slot, so that a route starts with the first source's first layer and ends
    with the last source's last layer. ``path`` replaces the slots by the
    constrained variant.
    """

    sources: list[str] | None = None
    repeats: int = 3
    scale: Literal["per_slot", "per_transition", "none"] = "per_transition"
    scale_bounds: tuple[float, float] = (0.5, 1.5)
    min_depth: int = 1
    max_depth: int | None = None
    first: Literal["forced", "free"] = "free"
    last: Literal["forced", "free"] = "free"
    path: PathSpec | None = None

    @field_validator("repeats", "min_depth")
    @classmethod
    def _at_least_one(cls, v):
        if v < 1:
            raise ValueError("must be at least 1")
        return v


class SpaceSpec(_Strict):
    """A search space as written in YAML."""

    name: str | None = None
    description: str | None = None
    methods: list[str] = []
    routing: RoutingSpec | None = None
    search: dict[str, SearchedParam | None] = {}
    fixed: dict[str, Any] = {}
    dtype: str | None = None


@dataclass(frozen=True)
class Gene:
    """One searched number: its Optuna name, bounds, and where it lands."""

    name: str
    low: float
    high: float
    param: str = ""
    method: str | None = None  # only used when this method is chosen
    model: str | None = None  # per-model parameters: the model's path
    group: str | None = None  # module-group filter, "" for the rest
    index: int = 0  # position along the depth
    kind: str = "float"  # or "bool" (route slots) or "choice" (route path picks)
    choices: tuple = ()


def load_space_spec(value: str | dict, root: Path) -> tuple[SpaceSpec, str]:
    """A space from a preset name, a YAML path (relative to ``root``) or an
    inline mapping; returns it and where it came from."""
    if isinstance(value, dict):
        data, where = value, "space"
    else:
        path = Path(value)
        candidates = [root / path, PRESETS / f"{value}.yaml"] if path.suffix else [PRESETS / f"{value}.yaml"]
        found = next((p for p in candidates if p.is_file()), None)
        if found is None:
            presets = ", ".join(sorted(p.stem for p in PRESETS.glob("*.yaml")))
            raise EvomergeError(f"search space {value!r} not found; give a YAML path or one of the presets: {presets}")
        try:
            data = yaml.safe_load(found.read_text())
        except (yaml.YAMLError, UnicodeDecodeError) as e:
            raise EvomergeError(f"search space {found} is not valid YAML ({str(e).splitlines()[0]}); fix it") from None
        where = str(found)
    if not isinstance(data, dict):
        raise EvomergeError(f"search space {where} is not a YAML mapping; write it as 'key: value' lines")
    try:
        return SpaceSpec.model_validate(data), where
    except ValidationError as e:
        raise field_error(f"search space {where}", e) from None


class SearchSpace:
    """Maps points to recipes for a given set of sources.

    ``models`` are the models merged (paths as the recipe will name them),
    ``base`` the optional base model, ``num_layers`` their depth.
    """

    def __init__(
        self,
        spec: SpaceSpec,
        *,
        models: list[str],
        base: str | None,
        num_layers: int,
        tensor_names: list[str] | None = None,
        seed: int = 0,
        dtype: str | None = None,
        where: str = "space",
        depths: dict[str, int] | None = None,
        fixed_merge: Recipe | None = None,
        relaxed: bool = False,
    ):
        self.spec = spec
        self.models = list(models)
        self.base = base
        self.num_layers = num_layers
        self.seed = seed
        self.dtype = dtype or spec.dtype
        self.where = where
        self.fixed_merge = fixed_merge
        # Optuna's CMA-ES sampler cannot learn categoricals: route slots and
        # picks become floats in [0, 1] for it (the continuous relaxation).
        self.relaxed = relaxed
        if not spec.methods and spec.routing is None:
            raise EvomergeError(f"{where} lists no methods; name at least one under 'methods' (or add 'routing')")
        if fixed_merge is not None and (spec.methods or spec.routing is None):
            raise EvomergeError(
                f"the config fixes a 'merge' recipe, so {where} may only search routing; remove its 'methods' "
                "(or the config's 'merge')"
            )
        self.methods: list[MergeMethod] = [get_method(m) for m in spec.methods]
        for m in self.methods:
            self._check_fit(m)
        self._check_params(tensor_names)
        self.genes = self._build_genes() if self.methods else []
        if spec.routing is not None:
            self._setup_routing(spec.routing, depths or {})
            self.genes += self._route_genes()
        self._by_name = {g.name: g for g in self.genes}

    # -- construction ------------------------------------------------------

    def _inputs(self, method: MergeMethod) -> tuple[list[str], str | None]:
        """The models a method merges, and its base, for these sources."""
        if method.name in ("slerp",):
            if self.base and len(self.models) == 1:
                return [self.base, self.models[0]], self.base
            return list(self.models[:2]), self.models[0] if self.models else None
        if method.base == "ignored":
            return list(self.models), None
        if self.base:
            return [self.base, *self.models], self.base
        return list(self.models), None

    def _check_fit(self, method: MergeMethod) -> None:
        refs, base = self._inputs(method)
        if method.name == "slerp" and len(self.models) > 2:
            raise EvomergeError(
                f"{self.where}: slerp merges exactly two models, but the config lists {len(self.models)}; "
                "list two models or use another method"
            )
        try:
            method.check_inputs(len(refs), base is not None)
        except EvomergeError as e:
            raise EvomergeError(f"{self.where} does not fit the sources: {e}") from None

    def _check_params(self, tensor_names: list[str] | None) -> None:
        names = {p for m in self.methods for p in m.param_names}
        for group in (self.spec.search, self.spec.fixed):
            for name in group:
                if name not in names:
                    raise EvomergeError(
                        f"{self.where}: no method in {self.spec.methods} has a parameter {name!r}; "
                        f"use one of {', '.join(sorted(names))}"
                    )
        both = set(self.spec.search) & set(self.spec.fixed)
        if both:
            raise EvomergeError(f"{self.where}: {sorted(both)[0]!r} is both searched and fixed; keep one")
        for name, how in self.spec.search.items():
            how = how or SearchedParam()
            for m in self.methods:
                if name in m.param_names and not m.param(name).searchable:
                    raise EvomergeError(
                        f"{self.where}: {name!r} of {m.name} is not a searchable number; move it to 'fixed'"
                    )
            if how.per == "block" and not how.block:
                raise EvomergeError(f"{self.where}: {name} is searched per block; set 'block' (layers per block)")
            if how.per == "gradient" and not how.points:
                raise EvomergeError(f"{self.where}: {name} is searched as a gradient; set 'points'")
            if how.per in ("layer", "block", "gradient") and self.num_layers < 1:
                raise EvomergeError(f"{self.where}: {name} is searched per layer, but the sources have no layers")
            if how.per == "block" and how.block > self.num_layers:
                raise EvomergeError(
                    f"{self.where}: block of {how.block} layers for {name} exceeds the sources' "
                    f"{self.num_layers} layers; use a smaller block"
                )
            if how.per == "gradient" and how.points > self.num_layers:
                raise EvomergeError(
                    f"{self.where}: {how.points} gradient points for {name} exceed the sources' "
                    f"{self.num_layers} layers; use fewer points"
                )
            if how.bounds is not None:
                lo, hi = how.bounds
                if not (math.isfinite(lo) and math.isfinite(hi)) or lo >= hi:
                    raise EvomergeError(
                        f"{self.where}: bounds {list(how.bounds)} of {name} are empty or reversed; "
                        "write [low, high] with low < high"
                    )
                for m in self.methods:
                    if name not in m.param_names:
                        continue
                    dlo, dhi = m.param(name).bounds
                    if lo < dlo or hi > dhi:
                        raise EvomergeError(
                            f"{self.where}: bounds {list(how.bounds)} of {name} are outside the range "
                            f"{m.name} declares, [{dlo}, {dhi}]; a space may only narrow it"
                        )
            if how.groups is not None:
                if not how.groups or len(set(how.groups)) != len(how.groups):
                    raise EvomergeError(f"{self.where}: groups of {name} must be distinct filters; fix the list")
                if tensor_names is not None:
                    for g in how.groups:
                        if not any(g in t for t in tensor_names):
                            raise EvomergeError(
                                f"{self.where}: group {g!r} of {name} matches no tensor of the sources; "
                                "use a substring of their tensor names (e.g. self_attn, mlp)"
                            )
        for m in self.methods:
            for p in m.params:
                if p.required and p.name not in self.spec.search and p.name not in self.spec.fixed:
                    raise EvomergeError(f"{self.where}: {m.name} needs {p.name!r}; add it under 'search' or 'fixed'")
            for name, value in self.spec.fixed.items():
                if name in m.param_names:
                    for leaf in value if isinstance(value, list) else [value]:
                        m.param(name).validate(leaf, f"{self.where} fixed")

    # -- routing -------------------------------------------------------------

    @property
    def hybrid(self) -> bool:
        return bool(self.methods) or self.fixed_merge is not None

    def _setup_routing(self, spec: RoutingSpec, depths: dict[str, int]) -> None:
        known = ([MERGED] if self.hybrid else []) + self.models
        routed = list(spec.sources or known)
        for name in routed:
            if name not in known:
                hint = f" ('{MERGED}' is the merge, only in a hybrid space)" if name == MERGED else ""
                raise EvomergeError(
                    f"{self.where}: routing source {name!r} is not a model of the config{hint}; "
                    f"use one of {', '.join(known)}"
                )
        if len(set(routed)) != len(routed) or not routed:
            raise EvomergeError(f"{self.where}: routing sources must be distinct and not empty; fix the list")
        # Depths default to ``num_layers`` (sources of one depth).
        depths = {**{n: self.num_layers for n in known}, **depths}
        self.routed = routed
        self.depths = {n: depths[n] for n in routed}
        self._labels = _short_names(routed)
        lo, hi = spec.scale_bounds
        if not (math.isfinite(lo) and math.isfinite(hi)) or lo >= hi or lo <= 0:
            raise EvomergeError(
                f"{self.where}: routing scale_bounds {list(spec.scale_bounds)} are empty, reversed or not positive; "
                "write [low, high] with 0 < low < high"
            )
        if spec.path is not None:
            self.slots = []
            self.path_depth = spec.path.depth or self.depths[routed[0]]
            self.max_depth = self.path_depth
            return
        self.slots = [(q, m, layer) for q in range(spec.repeats) for m in routed for layer in range(self.depths[m])]
        total = len(self.slots)
        self.max_depth = spec.max_depth if spec.max_depth is not None else total
        forced = (spec.first == "forced") + (spec.last == "forced" and total > 1)
        if not (1 <= spec.min_depth <= self.max_depth) or self.max_depth > total or forced > self.max_depth:
            raise EvomergeError(
                f"{self.where}: routing depth bounds [{spec.min_depth}, {self.max_depth}] do not fit the {total} "
                f"slots ({len(routed)} models x {spec.repeats} repeats); use 1 <= min_depth <= max_depth <= {total}"
            )

    def _forced(self, i: int) -> bool:
        spec = self.spec.routing
        return (i == 0 and spec.first == "forced") or (i == len(self.slots) - 1 and spec.last == "forced")

    def _slot_label(self, i: int) -> str:
        q, m, layer = self.slots[i]
        return f"r{q}/{self._labels[m]}/L{layer}"

    def _route_genes(self) -> list[Gene]:
        spec = self.spec.routing
        lo, hi = spec.scale_bounds
        genes: list[Gene] = []
        if spec.path is not None:
            for k in range(self.path_depth):
                genes.append(Gene(f"pick/p{k}", 0.0, 1.0, "route", index=k, kind="choice", choices=tuple(self.routed)))
            if spec.scale == "per_slot":
                genes += [Gene(f"scale/p{k}", lo, hi, "route", index=k) for k in range(self.path_depth)]
        else:
            for i in range(len(self.slots)):
                if not self._forced(i):
                    genes.append(Gene(f"in/{self._slot_label(i)}", 0.0, 1.0, "route", index=i, kind="bool"))
            if spec.scale == "per_slot":
                genes += [
                    Gene(f"scale/{self._slot_label(i)}", lo, hi, "route", index=i) for i in range(len(self.slots))
                ]
        if spec.scale == "per_transition":
            for a in self.routed:
                for b in self.routed:
                    genes.append(Gene(f"scale/{self._labels[a]}>{self._labels[b]}", lo, hi, "route"))
        return genes

    def _path_layer(self, model: str, k: int) -> int:
        depth, n = self.path_depth, self.depths[model]
        return min(n - 1, round(k * (n - 1) / (depth - 1))) if depth > 1 else 0

    def _route_from(self, params: dict[str, Any], strength: dict[str, float] | None = None) -> Route:
        """The route named by ``params``, repaired to the depth bounds: too
        few layers adds the skipped slots with the highest values (pycma) or
        the earliest ones; too many drops the lowest valued (or the last)."""
        spec = self.spec.routing
        if spec.path is not None:
            picks = [self._choice(self._by_name[f"pick/p{k}"], params) for k in range(self.path_depth)]
            steps = [(m, self._path_layer(m, k), f"scale/p{k}") for k, m in enumerate(picks)]
        else:
            chosen = []
            for i in range(len(self.slots)):
                chosen.append(self._forced(i) or self._flag(self._by_name[f"in/{self._slot_label(i)}"], params))
            free = [i for i in range(len(self.slots)) if not self._forced(i)]

            def rank(i: int) -> float:
                name = f"in/{self._slot_label(i)}"
                if strength and name in strength:
                    return strength[name]
                return float(params[name]) if self.relaxed else -i / len(self.slots)

            count = sum(chosen)
            for i in sorted((i for i in free if not chosen[i]), key=rank, reverse=True):
                if count >= spec.min_depth:
                    break
                chosen[i], count = True, count + 1
            for i in sorted((i for i in free if chosen[i]), key=rank):
                if count <= self.max_depth:
                    break
                chosen[i], count = False, count - 1
            steps = [
                (self.slots[i][1], self.slots[i][2], f"scale/{self._slot_label(i)}")
                for i in range(len(self.slots))
                if chosen[i]
            ]
        layers = []
        for k, (model, layer, scale_gene) in enumerate(steps):
            scale = 1.0
            if spec.scale == "per_slot":
                scale = float(params[scale_gene])
            elif spec.scale == "per_transition" and k:
                prev = steps[k - 1][0]
                scale = float(params[f"scale/{self._labels[prev]}>{self._labels[model]}"])
            layers.append(RouteStep(model=model, layer=layer, scale=round(scale, DIGITS)))
        return Route(layers=layers)

    def _flag(self, g: Gene, params: dict[str, Any]) -> bool:
        if g.name not in params:
            raise EvomergeError(f"point lacks {g.name!r}; it does not belong to this space")
        v = params[g.name]
        return bool(v) if isinstance(v, bool) else float(v) > 0.5

    def _choice(self, g: Gene, params: dict[str, Any]) -> str:
        if g.name not in params:
            raise EvomergeError(f"point lacks {g.name!r}; it does not belong to this space")
        v = params[g.name]
        if isinstance(v, str):
            return v
        return g.choices[min(len(g.choices) - 1, int(float(v) * len(g.choices)))]

    def _encode_route(self, route: Route) -> dict[str, Any] | None:
        spec = self.spec.routing
        lo, hi = spec.scale_bounds
        neutral = 1.0 if lo <= 1.0 <= hi else round((lo + hi) / 2, DIGITS)
        params: dict[str, Any] = {}
        steps = route.layers
        if route.embed is not None or route.head is not None:
            return None
        if spec.path is not None:
            if len(steps) != self.path_depth:
                return None
            for k, st in enumerate(steps):
                if st.model not in self.routed or self._path_layer(st.model, k) != st.layer:
                    return None
                params[f"pick/p{k}"] = self._encoded_choice(st.model)
                if spec.scale == "per_slot":
                    params[f"scale/p{k}"] = st.scale
        else:
            included, pos = [], 0
            for st in steps:
                while pos < len(self.slots) and self.slots[pos][1:] != (st.model, st.layer):
                    pos += 1
                if pos == len(self.slots):
                    return None
                included.append(pos)
                pos += 1
            last = len(self.slots) - 1
            if included and self._forced(last) and self.slots[last][1:] == (steps[-1].model, steps[-1].layer):
                included[-1] = last  # the same route, with the forced last slot as its end
            for i in range(len(self.slots)):
                if self._forced(i):
                    if i not in included:
                        return None
                else:
                    on = i in included
                    params[f"in/{self._slot_label(i)}"] = (0.75 if on else 0.25) if self.relaxed else on
            if spec.scale == "per_slot":
                by_slot = dict(zip(included, (st.scale for st in steps)))
                for i in range(len(self.slots)):
                    params[f"scale/{self._slot_label(i)}"] = by_slot.get(i, neutral)
        if spec.scale == "per_transition":
            w: dict[str, float] = {}
            for k in range(1, len(steps)):
                key = f"scale/{self._labels[steps[k - 1].model]}>{self._labels[steps[k].model]}"
                if w.setdefault(key, steps[k].scale) != steps[k].scale:
                    return None
            for a in self.routed:
                for b in self.routed:
                    key = f"scale/{self._labels[a]}>{self._labels[b]}"
                    params[key] = w.get(key, neutral)
        return params

    def _encoded_choice(self, model: str) -> Any:
        if not self.relaxed:
            return model
        return (self.routed.index(model) + 0.5) / len(self.routed)

    def _depth_slots(self, how: SearchedParam) -> list[str]:
        if how.per == "global":
            return [""]
        if how.per == "layer":
            return [f"L{i}" for i in range(self.num_layers)]
        if how.per == "block":
            n = math.ceil(self.num_layers / how.block)
            spans = [(i * how.block, min(self.num_layers, (i + 1) * how.block) - 1) for i in range(n)]
            return [f"L{a}" if a == b else f"L{a}-{b}" for a, b in spans]
        return [f"g{i}" for i in range(how.points)]

    def _build_genes(self) -> list[Gene]:
        genes: list[Gene] = []
        if len(self.methods) > 1:
            genes.append(Gene(METHOD_GENE, 0.0, 1.0))
        short = _short_names(self.models + ([self.base] if self.base else []))
        for name, how in self.spec.search.items():
            how = how or SearchedParam()
            for m in self.methods:
                if name not in m.param_names:
                    continue
                p = m.param(name)
                lo, hi = how.bounds or p.bounds
                refs, base = self._inputs(m)
                owners: list[str | None]
                if p.scope == "per_model":
                    owners = [r for r in refs if r != base]
                elif p.scope == "per_input":
                    owners = list(refs)
                else:
                    owners = [None]
                groups = [*how.groups, ""] if how.groups else [None]
                tag = f"{m.name}." if len(self.methods) > 1 else ""
                for owner in owners:
                    for group in groups:
                        for i, slot in enumerate(self._depth_slots(how)):
                            parts = [f"{tag}{name}"]
                            if owner is not None:
                                parts.append(short[owner])
                            if group is not None:
                                parts.append(group or "rest")
                            if slot:
                                parts.append(slot)
                            genes.append(Gene("/".join(parts), lo, hi, name, m.name, owner, group, i))
        if not genes:
            raise EvomergeError(f"{self.where} searches nothing; list parameters under 'search'")
        return genes

    # -- facts ---------------------------------------------------------------

    @property
    def dim(self) -> int:
        return len(self.genes)

    def fingerprint(self) -> str:
        """A hash of everything that decides which recipe a point becomes."""
        data = {
            "spec": self.spec.model_dump(mode="json", exclude={"name", "description"}),
            "models": self.models,
            "base": self.base,
            "layers": self.num_layers,
            "seed": self.seed,
            "dtype": self.dtype,
        }
        if self.spec.routing is not None:
            data["routed"] = [[n, self.depths[n]] for n in self.routed]
            data["relaxed"] = self.relaxed
        if self.fixed_merge is not None:
            data["fixed_merge"] = self.fixed_merge.fingerprint()
        return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()

    def x0(self) -> list[float]:
        """The centre of the unit cube (pycma's default start)."""
        return [0.5] * self.dim

    def distributions(self) -> dict[str, Any]:
        """Optuna distributions for every gene (the method as a categorical)."""
        import optuna

        out: dict[str, Any] = {}
        for g in self.genes:
            if g.name == METHOD_GENE:
                out[g.name] = optuna.distributions.CategoricalDistribution(self.spec.methods)
            elif g.kind != "float" and not self.relaxed:
                choices = [False, True] if g.kind == "bool" else list(g.choices)
                out[g.name] = optuna.distributions.CategoricalDistribution(choices)
            else:
                out[g.name] = optuna.distributions.FloatDistribution(g.low, g.high)
        return out

    # -- points <-> recipes ------------------------------------------------

    def _method_of(self, params: dict[str, Any]) -> MergeMethod | None:
        if METHOD_GENE in params:
            return get_method(params[METHOD_GENE])
        return self.methods[0] if self.methods else None

    def active(self, method: str | None) -> list[Gene]:
        """The genes a recipe of ``method`` uses (the method gene and the
        route's genes included)."""
        return [g for g in self.genes if g.name == METHOD_GENE or g.method == method or g.param == "route"]

    def suggest(self, trial) -> Recipe:
        """Ask an Optuna trial for a point (define-by-run) and decode it."""
        params: dict[str, Any] = {}
        if len(self.methods) > 1:
            params[METHOD_GENE] = trial.suggest_categorical(METHOD_GENE, self.spec.methods)
        method = self._method_of(params)
        for g in self.active(method.name if method else None):
            if g.name == METHOD_GENE:
                continue
            if g.kind == "float" or self.relaxed:
                params[g.name] = trial.suggest_float(g.name, g.low, g.high)
            else:
                choices = [False, True] if g.kind == "bool" else list(g.choices)
                params[g.name] = trial.suggest_categorical(g.name, choices)
        return self.decode_params(params)

    def unit_to_params(self, x) -> dict[str, Any]:
        """Unit-cube vector -> named values (the method picked by bins)."""
        if len(x) != self.dim:
            raise ValueError(f"point has {len(x)} coordinates, the space {self.dim}")
        params: dict[str, Any] = {}
        strength: dict[str, float] = {}
        for g, v in zip(self.genes, x):
            v = min(1.0, max(0.0, float(v)))
            if g.name == METHOD_GENE:
                params[g.name] = self.spec.methods[min(len(self.methods) - 1, int(v * len(self.methods)))]
            elif g.kind != "float" and self.relaxed:
                params[g.name] = round(v, DIGITS)
            elif g.kind == "bool":
                params[g.name], strength[g.name] = v > 0.5, v
            elif g.kind == "choice":
                params[g.name] = g.choices[min(len(g.choices) - 1, int(v * len(g.choices)))]
            else:
                params[g.name] = round(g.low + v * (g.high - g.low), DIGITS)
        if strength:
            # Repair to the depth bounds here, by the values, so that the
            # stored point is the route that was scored.
            route = self._route_from(params, strength)
            fixed = self._encode_route(route) or {}
            params.update({k: v for k, v in fixed.items() if k.startswith("in/")})
        method = self._method_of(params)
        keep = {g.name for g in self.active(method.name if method else None)}
        return {k: v for k, v in params.items() if k in keep}

    def params_to_unit(self, params: dict[str, Any]) -> list[float]:
        """Named values -> unit-cube vector (unused genes at the centre)."""
        x = []
        for g in self.genes:
            if g.name == METHOD_GENE:
                k = self.spec.methods.index(params[g.name])
                x.append((k + 0.5) / len(self.methods))
            elif g.kind != "float" and g.name in params and not self.relaxed:
                v = params[g.name]
                x.append((0.75 if v else 0.25) if g.kind == "bool" else (g.choices.index(v) + 0.5) / len(g.choices))
            elif g.name in params:
                x.append((float(params[g.name]) - g.low) / (g.high - g.low))
            else:
                x.append(0.5)
        return x

    def decode(self, x) -> Recipe:
        return self.decode_params(self.unit_to_params(x))

    def decode_params(self, params: dict[str, Any]) -> Recipe:
        """Named values (as Optuna stores them) -> the recipe they stand for."""
        if self.spec.routing is None:
            return self._decode_merge(params)
        route = self._route_from(params)
        common = {"dtype": self.dtype, "seed": self.seed, "route": route}
        if self.methods:
            merge = self._decode_merge(params)
            return Recipe(**{**merge.model_dump(exclude={"route", "metadata"}), **common})
        if self.fixed_merge is not None:
            inputs = {s.model for s in self.fixed_merge.sources}
            extra = [Source(model=m) for m in self.routed if m != MERGED and m not in inputs]
            route = route.model_copy(update={"models": extra or None})
            return Recipe(**{**self.fixed_merge.model_dump(exclude={"route", "metadata"}), "route": route})
        return Recipe(sources=[Source(model=m) for m in self.routed], **common)

    def _decode_merge(self, params: dict[str, Any]) -> Recipe:
        method = self._method_of(params)
        refs, base = self._inputs(method)
        per_model: dict[str, dict[str, Any]] = {r: {} for r in refs}
        shared: dict[str, Any] = {}

        def put(p_name: str, owner: str | None, value: Any) -> None:
            (shared if owner is None else per_model[owner])[p_name] = value

        for p in method.params:
            if p.name in self.spec.fixed:
                value = self.spec.fixed[p.name]
                if p.scope == "shared":
                    put(p.name, None, value)
                else:
                    for r in refs:
                        if p.scope == "per_input" or r != base:
                            put(p.name, r, value)
                continue
            if p.name not in self.spec.search:
                continue
            how = self.spec.search[p.name] or SearchedParam()
            genes = [g for g in self.active(method.name) if g.param == p.name]
            owners = dict.fromkeys(g.model for g in genes)
            for owner in owners:
                mine = [g for g in genes if g.model == owner]
                settings = []
                for group in dict.fromkeys(g.group for g in mine):
                    values = []
                    for g in sorted((g for g in mine if g.group == group), key=lambda g: g.index):
                        if g.name not in params:
                            raise EvomergeError(f"point lacks {g.name!r}; it does not belong to this space")
                        values.append(round(float(params[g.name]), DIGITS))
                    settings.append((group, self._along_depth(how, values)))
                if settings[0][0] is None:
                    put(p.name, owner, settings[0][1])
                else:
                    put(
                        p.name,
                        owner,
                        [Conditional(value=v, filter=g or None) for g, v in settings],
                    )
        sources = [Source(model=r, parameters=per_model[r] or None) for r in refs]
        return Recipe(
            method=method.name,
            sources=sources,
            base_model=base if method.base != "ignored" else None,
            parameters=shared or None,
            dtype=self.dtype,
            seed=self.seed,
        )

    def _along_depth(self, how: SearchedParam, values: list[float]) -> Any:
        if how.per == "block":
            values = [values[i // how.block] for i in range(self.num_layers)]
        if len(set(values)) == 1:
            return values[0]
        return values

    def encode(self, recipe: Recipe) -> dict[str, Any] | None:
        """A recipe's named values, or None when this space cannot express it
        exactly (another method, models, fixed values or a finer structure)."""
        try:
            params = self._encode(recipe)
        except (KeyError, ValueError, TypeError, IndexError):
            return None
        if params is None:
            return None
        try:
            same = self.decode_params(params).fingerprint() == recipe.fingerprint()
        except EvomergeError:
            return None
        return params if same else None

    def _encode(self, recipe: Recipe) -> dict[str, Any] | None:
        if self.spec.routing is None:
            return self._encode_merge(recipe)
        if recipe.route is None:
            return None
        params = self._encode_route(recipe.route)
        if params is None:
            return None
        if self.methods:
            merge = self._encode_merge(recipe.merge_part())
            return None if merge is None else {**merge, **params}
        if self.fixed_merge is not None:
            same = (
                recipe.merge_part() is not None and recipe.merge_part().fingerprint() == self.fixed_merge.fingerprint()
            )
            return params if same else None
        return params if recipe.method is None else None

    def _encode_merge(self, recipe: Recipe | None) -> dict[str, Any] | None:
        if recipe is None or recipe.method not in self.spec.methods or recipe.slices:
            return None
        method = get_method(recipe.method)
        params: dict[str, Any] = {}
        if len(self.methods) > 1:
            params[METHOD_GENE] = recipe.method
        by_model = {s.model: s.parameters or {} for s in recipe.sources}
        shared = recipe.parameters or {}
        for g in self.active(method.name):
            if g.name == METHOD_GENE or g.param == "route":
                continue
            setting = shared.get(g.param) if g.model is None else by_model[g.model].get(g.param)
            if setting is None:
                setting = method.param(g.param).default
            if isinstance(setting, list) and setting and isinstance(setting[0], Conditional):
                match = [c for c in setting if (c.filter or "") == (g.group or "")]
                if not match:
                    return None
                setting = match[0].value
            elif isinstance(setting, Conditional):
                return None
            how = self.spec.search[g.param] or SearchedParam()
            value = _value_at(setting, how, g.index, self.num_layers)
            if value is None or not g.low <= value <= g.high:
                return None
            params[g.name] = value
        return params


def _value_at(setting: Any, how: SearchedParam, index: int, num_layers: int) -> float | None:
    if not isinstance(setting, list):
        return float(setting)
    if how.per == "gradient" and len(setting) == how.points:
        return float(setting[index])
    if how.per == "layer" and len(setting) == num_layers:
        return float(setting[index])
    if how.per == "block" and len(setting) == num_layers:
        block = setting[index * how.block : (index + 1) * how.block]
        return float(block[0]) if len(set(block)) == 1 else None
    return None


def _short_names(refs: list[str]) -> dict[str, str]:
    """Readable, unique labels for model paths (their last path part)."""
    out: dict[str, str] = {}
    for i, r in enumerate(refs):
        label = Path(r).name or r
        out[r] = label if label not in out.values() else f"{label}#{i}"
    return out


def preset_names() -> list[str]:
    return sorted(p.stem for p in PRESETS.glob("*.yaml"))


__all__ = [
    "SearchSpace",
    "SpaceSpec",
    "SearchedParam",
    "RoutingSpec",
    "PathSpec",
    "Gene",
    "load_space_spec",
    "preset_names",
    "METHODS",
]
