"""The genes of a search space: the numbers an optimizer searches, in two kinds.

``MergeGenes`` are the merge half (which method, and the values of its
searched parameters, per model, module group and depth); ``RouteGenes`` are
the routing half (which layer slots a route runs, or which model each
position of a fixed-depth path takes, and the scales of the steps). Both offer
one small interface: their ``genes``, the Optuna ``distributions`` of those
genes, ``suggest`` (define-by-run), ``unit_to_params``/``params_to_unit``
between the unit cube and named values, ``decode`` of named values into
their part of a recipe, and ``encode`` of that part back, which raises
:class:`NotInSpace` with the reason when the part cannot be expressed.
The parts of a space file the genes are built from (``SearchedParam``,
``RoutingSpec``, ``PathSpec``) are declared here too, so this module needs
nothing from ``evomerge.search.space``, which validates a whole space file and
composes the two kinds of genes into a ``SearchSpace``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from pydantic import field_validator

from evomerge.engine.methods import MergeMethod, get_method
from evomerge.engine.recipe import MERGED, Conditional, Recipe, Route, RouteStep, Source
from evomerge.errors import EvomergeError
from evomerge.schema import Strict

DIGITS = 6
METHOD_GENE = "method"


class SearchedParam(Strict):
    """How one parameter is searched: its granularity, module groups and narrowed bounds."""

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


class PathSpec(Strict):
    """The constrained routing variant: a path of fixed ``depth`` whose
    position k runs layer k (scaled to each model's depth) of a chosen model."""

    depth: int | None = None  # default: the first routing source's depth

    @field_validator("depth")
    @classmethod
    def _positive(cls, v):
        if v is not None and v < 1:
            raise ValueError("must be at least 1")
        return v


class RoutingSpec(Strict):
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


class NotInSpace(EvomergeError):
    """A recipe this space cannot express exactly; the message says why."""


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


def short_names(refs: list[str]) -> dict[str, str]:
    """Readable, unique labels for model paths (their last path part)."""
    out: dict[str, str] = {}
    for i, r in enumerate(refs):
        label = Path(r).name or r
        out[r] = label if label not in out.values() else f"{label}#{i}"
    return out


def check_param_names(methods: list[MergeMethod], search: dict, fixed: dict, where: str) -> None:
    """Refuse parameters no listed method declares, and ones both searched and fixed."""
    names = {p for m in methods for p in m.param_names}
    for group in (search, fixed):
        for name in group:
            if name not in names:
                raise EvomergeError(
                    f"{where}: no method in {[m.name for m in methods]} has a parameter {name!r}; "
                    f"use one of {', '.join(sorted(names))}"
                )
    both = set(search) & set(fixed)
    if both:
        raise EvomergeError(f"{where}: {sorted(both)[0]!r} is both searched and fixed; keep one")


def _in_words(n: int) -> str:
    return {1: "one", 2: "two", 3: "three"}.get(n, str(n))


def _number(value: Any, what: str) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):
        raise NotInSpace(f"{what} is {value!r}, not a number") from None


class MergeGenes:
    """The merge half of a space: the method choice and each method's searched parameter values.

    A space of several methods makes the method a choice: the gene
    ``method`` comes first, then every method's own genes, named
    ``method.param/...``. Optuna suggests ``method`` as a categorical and
    then only the chosen method's genes (conditional parameters). In the
    unit cube (pycma), ``method`` is one coordinate cut into equal bins, one
    per method in the order listed; the other methods' coordinates are
    ignored (they change neither the recipe nor the named values kept), and
    ``params_to_unit`` puts them at the centre. A searched name is searched
    for each listed method that declares it as a searchable number; a method
    that declares it otherwise (ram's epsilon) keeps its default. A method
    with nothing to search (karcher, arcee_fusion, ram) may be in a choice,
    as long as another method searches something.
    """

    def __init__(
        self,
        methods: list[MergeMethod],
        search: dict[str, SearchedParam],
        fixed: dict[str, Any],
        *,
        models: list[str],
        base: str | None,
        num_layers: int,
        tensor_names: list[str] | None,
        where: str,
        dtype: str | None,
        seed: int,
    ):
        self.methods = methods
        self.names = [m.name for m in methods]
        self.search = search  # every value a SearchedParam (None already replaced)
        self.fixed = fixed
        self.models = models
        self.base = base
        self.num_layers = num_layers
        self.where = where
        self.dtype = dtype
        self.seed = seed
        for m in methods:
            self._check_fit(m)
        check_param_names(methods, search, fixed, where)
        for name, how in search.items():
            self._check_searched(name, how, tensor_names)
        self._check_required_and_fixed()
        self.genes = self._build_genes()

    # -- construction ------------------------------------------------------

    def inputs(self, method: MergeMethod) -> tuple[list[str], str | None]:
        """The models a method merges, and its base, for these sources."""
        if method.base_is_endpoint:
            n = method.max_inputs or len(self.models)
            if self.base and len(self.models) == n - 1:
                return [self.base, *self.models], self.base
            return list(self.models[:n]), self.models[0] if self.models else None
        if method.base == "ignored":
            return list(self.models), None
        if self.base:
            return [self.base, *self.models], self.base
        return list(self.models), None

    def _check_fit(self, method: MergeMethod) -> None:
        refs, base = self.inputs(method)
        n = method.max_inputs
        if method.base_is_endpoint and n is not None and len(self.models) > n:
            raise EvomergeError(
                f"{self.where}: {method.name} merges exactly {_in_words(n)} models, but the config lists "
                f"{len(self.models)}; list {_in_words(n)} models or use another method"
            )
        try:
            method.check_inputs(len(refs), base is not None)
        except EvomergeError as e:
            raise EvomergeError(f"{self.where} does not fit the sources: {e}") from None

    def _check_searched(self, name: str, how: SearchedParam, tensor_names: list[str] | None) -> None:
        at = self.where
        # In a choice, a searched name is searched for each method that can
        # search it; one that declares it otherwise keeps its own default.
        declaring = [m for m in self.methods if name in m.param_names]
        if not any(m.param(name).searchable for m in declaring):
            raise EvomergeError(f"{at}: {name!r} of {declaring[0].name} is not a searchable number; move it to 'fixed'")
        if how.per == "block" and not how.block:
            raise EvomergeError(f"{at}: {name} is searched per block; set 'block' (layers per block)")
        if how.per == "gradient" and not how.points:
            raise EvomergeError(f"{at}: {name} is searched as a gradient; set 'points'")
        if how.per in ("layer", "block", "gradient") and self.num_layers < 1:
            raise EvomergeError(f"{at}: {name} is searched per layer, but the sources have no layers")
        if how.per == "block" and how.block > self.num_layers:
            raise EvomergeError(
                f"{at}: block of {how.block} layers for {name} exceeds the sources' "
                f"{self.num_layers} layers; use a smaller block"
            )
        if how.per == "gradient" and how.points > self.num_layers:
            raise EvomergeError(
                f"{at}: {how.points} gradient points for {name} exceed the sources' "
                f"{self.num_layers} layers; use fewer points"
            )
        if how.bounds is not None:
            self._check_bounds(name, how.bounds)
        if how.groups is not None:
            self._check_groups(name, how.groups, tensor_names)

    def _check_bounds(self, name: str, bounds: tuple[float, float]) -> None:
        lo, hi = bounds
        if not (math.isfinite(lo) and math.isfinite(hi)) or lo >= hi:
            raise EvomergeError(
                f"{self.where}: bounds {list(bounds)} of {name} are empty or reversed; write [low, high] with low < high"
            )
        for m in self.methods:
            if not self._searches(m, name):
                continue
            dlo, dhi = m.param(name).bounds
            if lo < dlo or hi > dhi:
                raise EvomergeError(
                    f"{self.where}: bounds {list(bounds)} of {name} are outside the range "
                    f"{m.name} declares, [{dlo}, {dhi}]; a space may only narrow it"
                )

    def _check_groups(self, name: str, groups: list[str], tensor_names: list[str] | None) -> None:
        if not groups or len(set(groups)) != len(groups):
            raise EvomergeError(f"{self.where}: groups of {name} must be distinct filters; fix the list")
        if tensor_names is None:
            return
        for g in groups:
            if not any(g in t for t in tensor_names):
                raise EvomergeError(
                    f"{self.where}: group {g!r} of {name} matches no tensor of the sources; "
                    "use a substring of their tensor names (e.g. self_attn, mlp)"
                )

    def _searches(self, method: MergeMethod, name: str) -> bool:
        """Whether this space searches ``name`` for ``method``."""
        return name in self.search and name in method.param_names and method.param(name).searchable

    def _check_required_and_fixed(self) -> None:
        for m in self.methods:
            for p in m.params:
                if p.required and not self._searches(m, p.name) and p.name not in self.fixed:
                    raise EvomergeError(f"{self.where}: {m.name} needs {p.name!r}; add it under 'search' or 'fixed'")
            for name, value in self.fixed.items():
                if name in m.param_names:
                    for leaf in value if isinstance(value, list) else [value]:
                        m.param(name).validate(leaf, f"{self.where} fixed")

    def _depth_slots(self, how: SearchedParam) -> list[str]:
        """The name suffix of each value along the depth ("" for one value)."""
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
        short = short_names(self.models + ([self.base] if self.base else []))
        for name, how in self.search.items():
            for m in self.methods:
                if self._searches(m, name):
                    genes += self._param_genes(m, name, how, short)
        if not genes:
            # A choice may hold methods with nothing to search (karcher,
            # arcee_fusion, ram), but not only those: the method alone is one
            # categorical coordinate, which pycma cannot search.
            if len(self.methods) > 1:
                raise EvomergeError(
                    f"{self.where} searches only which method to use; "
                    "list under 'search' a parameter of at least one of its methods"
                )
            raise EvomergeError(f"{self.where} searches nothing; list parameters under 'search'")
        if len(self.methods) > 1:
            genes.insert(0, Gene(METHOD_GENE, 0.0, 1.0))
        return genes

    def _param_genes(self, m: MergeMethod, name: str, how: SearchedParam, short: dict[str, str]) -> list[Gene]:
        """The genes of one searched parameter of one method, named
        ``[method.]param[/model][/group][/depth slot]``."""
        p = m.param(name)
        lo, hi = how.bounds or p.bounds
        refs, base = self.inputs(m)
        owners: list[str | None]
        if p.scope == "per_model":
            owners = [r for r in refs if r != base]
        elif p.scope == "per_input":
            owners = list(refs)
        else:
            owners = [None]
        groups = [*how.groups, ""] if how.groups else [None]
        tag = f"{m.name}." if len(self.methods) > 1 else ""
        genes = []
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
        return genes

    # -- points ----------------------------------------------------------------

    def method_of(self, params: dict[str, Any]) -> MergeMethod:
        if METHOD_GENE in params:
            return get_method(params[METHOD_GENE])
        return self.methods[0]

    def active(self, method: str | None) -> list[Gene]:
        """The genes a recipe of ``method`` uses (the method gene included)."""
        return [g for g in self.genes if g.name == METHOD_GENE or g.method == method]

    def distributions(self) -> dict[str, Any]:
        import optuna

        out: dict[str, Any] = {}
        for g in self.genes:
            if g.name == METHOD_GENE:
                out[g.name] = optuna.distributions.CategoricalDistribution(self.names)
            else:
                out[g.name] = optuna.distributions.FloatDistribution(g.low, g.high)
        return out

    def suggest(self, trial) -> dict[str, Any]:
        params: dict[str, Any] = {}
        if len(self.methods) > 1:
            params[METHOD_GENE] = trial.suggest_categorical(METHOD_GENE, self.names)
        for g in self.active(self.method_of(params).name):
            if g.name != METHOD_GENE:
                params[g.name] = trial.suggest_float(g.name, g.low, g.high)
        return params

    def unit_to_params(self, x: list[float]) -> dict[str, Any]:
        """Unit-cube coordinates (clipped) of these genes -> the named values
        of the chosen method's genes (the method picked by equal bins)."""
        params: dict[str, Any] = {}
        for g, v in zip(self.genes, x):
            v = min(1.0, max(0.0, float(v)))
            if g.name == METHOD_GENE:
                params[g.name] = self.names[min(len(self.methods) - 1, int(v * len(self.methods)))]
            else:
                params[g.name] = round(g.low + v * (g.high - g.low), DIGITS)
        keep = {g.name for g in self.active(self.method_of(params).name)}
        return {k: v for k, v in params.items() if k in keep}

    def params_to_unit(self, params: dict[str, Any]) -> list[float]:
        x = []
        for g in self.genes:
            if g.name == METHOD_GENE:
                k = self.names.index(params[g.name])
                x.append((k + 0.5) / len(self.methods))
            elif g.name in params:
                x.append((float(params[g.name]) - g.low) / (g.high - g.low))
            else:
                x.append(0.5)
        return x

    # -- recipes -----------------------------------------------------------------

    def decode(self, params: dict[str, Any]) -> Recipe:
        """Named values -> the merge recipe they stand for."""
        method = self.method_of(params)
        refs, base = self.inputs(method)
        per_model: dict[str, dict[str, Any]] = {r: {} for r in refs}
        shared: dict[str, Any] = {}
        for p in method.params:
            if p.name in self.fixed:
                owners = [None] if p.scope == "shared" else [r for r in refs if p.scope == "per_input" or r != base]
                settings = {owner: self.fixed[p.name] for owner in owners}
            elif self._searches(method, p.name):
                settings = self._searched_settings(method, p.name, params)
            else:
                continue
            for owner, value in settings.items():
                (shared if owner is None else per_model[owner])[p.name] = value
        return Recipe(
            method=method.name,
            sources=[Source(model=r, parameters=per_model[r] or None) for r in refs],
            base_model=base if method.base != "ignored" else None,
            parameters=shared or None,
            dtype=self.dtype,
            seed=self.seed,
        )

    def _searched_settings(self, method: MergeMethod, name: str, params: dict[str, Any]) -> dict[str | None, Any]:
        """Each owner's (a model, or None for shared) setting of a searched
        parameter: a number, a list along the depth, or per-group conditionals."""
        how = self.search[name]
        genes = [g for g in self.active(method.name) if g.param == name]
        out: dict[str | None, Any] = {}
        for owner in dict.fromkeys(g.model for g in genes):
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
                out[owner] = settings[0][1]
            else:
                out[owner] = [Conditional(value=v, filter=g or None) for g, v in settings]
        return out

    def _along_depth(self, how: SearchedParam, values: list[float]) -> Any:
        if how.per == "block":
            values = [values[i // how.block] for i in range(self.num_layers)]
        if len(set(values)) == 1:
            return values[0]
        return values

    def encode(self, recipe: Recipe | None) -> dict[str, Any]:
        """A merge recipe's named values; raises NotInSpace when these genes
        cannot hold it (the caller checks that they decode to the same recipe)."""
        if recipe is None:
            raise NotInSpace("it has no merge method, and this space searches one")
        if recipe.method not in self.names:
            raise NotInSpace(f"its method {recipe.method!r} is not one this space searches ({', '.join(self.names)})")
        if recipe.slices:
            raise NotInSpace("it is built from slices, which this space does not search")
        method = get_method(recipe.method)
        params: dict[str, Any] = {}
        if len(self.methods) > 1:
            params[METHOD_GENE] = recipe.method
        by_model = {s.model: s.parameters or {} for s in recipe.sources}
        for g in self.active(method.name):
            if g.name == METHOD_GENE:
                continue
            if g.model is not None and g.model not in by_model:
                raise NotInSpace(f"it does not merge {g.model}, which this space does")
            setting = (recipe.parameters or {}).get(g.param) if g.model is None else by_model[g.model].get(g.param)
            if setting is None:
                setting = method.param(g.param).default
            value = self._value_of(g, setting)
            if not g.low <= value <= g.high:
                raise NotInSpace(f"{g.name} = {value} is outside the space's range [{g.low}, {g.high}]")
            params[g.name] = value
        return params

    def _value_of(self, g: Gene, setting: Any) -> float:
        """The value gene ``g`` takes from a recipe's setting of its parameter."""
        whose = g.param if g.model is None else f"{g.param} of {g.model}"
        if isinstance(setting, list) and setting and isinstance(setting[0], Conditional):
            match = [c for c in setting if (c.filter or "") == (g.group or "")]
            if not match:
                raise NotInSpace(f"{whose} has no value for the module group {g.group or 'rest'!r} of {g.name}")
            setting = match[0].value
        elif isinstance(setting, Conditional):
            raise NotInSpace(f"{whose} is one filtered value, which this space does not search")
        how = self.search[g.param]
        if not isinstance(setting, list):
            return _number(setting, whose)
        if how.per == "gradient" and len(setting) == how.points:
            return _number(setting[g.index], whose)
        if how.per == "layer" and len(setting) == self.num_layers:
            return _number(setting[g.index], whose)
        if how.per == "block" and len(setting) == self.num_layers:
            block = setting[g.index * how.block : (g.index + 1) * how.block]
            if any(v != block[0] for v in block):
                raise NotInSpace(f"{whose} varies within the block of {g.name}")
            return _number(block[0], whose)
        raise NotInSpace(f"{whose} has {len(setting)} values, which do not fit its search per {how.per}")


class RouteGenes:
    """The routing half of a space: which layer slots a route runs, or which
    model each position of a path takes, and the scales of its steps.

    ``relaxed`` (for Optuna's CMA-ES sampler, which cannot learn
    categoricals) makes slot flags and path picks floats in [0, 1].
    """

    def __init__(
        self,
        spec: RoutingSpec,
        *,
        models: list[str],
        hybrid: bool,
        num_layers: int,
        depths: dict[str, int],
        where: str,
        relaxed: bool,
    ):
        self.spec = spec
        self.where = where
        self.relaxed = relaxed
        self._pick_sources(models, hybrid, num_layers, depths)
        lo, hi = spec.scale_bounds
        if not (math.isfinite(lo) and math.isfinite(hi)) or lo >= hi or lo <= 0:
            raise EvomergeError(
                f"{where}: routing scale_bounds {list(spec.scale_bounds)} are empty, reversed or not positive; "
                "write [low, high] with 0 < low < high"
            )
        if spec.path is not None:
            self.slots: list[tuple[int, str, int]] = []
            self.path_depth = spec.path.depth or self.depths[self.routed[0]]
            self.max_depth = self.path_depth
        else:
            self._lay_out_slots()
        self.genes = self._path_genes() if spec.path is not None else self._slot_genes()
        self.genes += self._transition_genes()
        self._by_name = {g.name: g for g in self.genes}

    # -- construction ------------------------------------------------------

    def _pick_sources(self, models: list[str], hybrid: bool, num_layers: int, depths: dict[str, int]) -> None:
        known = ([MERGED] if hybrid else []) + models
        routed = list(self.spec.sources or known)
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
        depths = {**{n: num_layers for n in known}, **depths}
        self.routed = routed
        self.depths = {n: depths[n] for n in routed}
        self._labels = short_names(routed)

    def _lay_out_slots(self) -> None:
        spec = self.spec
        self.slots = [
            (q, m, layer) for q in range(spec.repeats) for m in self.routed for layer in range(self.depths[m])
        ]
        total = len(self.slots)
        self.max_depth = spec.max_depth if spec.max_depth is not None else total
        forced = (spec.first == "forced") + (spec.last == "forced" and total > 1)
        if not (1 <= spec.min_depth <= self.max_depth) or self.max_depth > total or forced > self.max_depth:
            raise EvomergeError(
                f"{self.where}: routing depth bounds [{spec.min_depth}, {self.max_depth}] do not fit the {total} "
                f"slots ({len(self.routed)} models x {spec.repeats} repeats); "
                f"use 1 <= min_depth <= max_depth <= {total}"
            )

    def _forced(self, i: int) -> bool:
        spec = self.spec
        return (i == 0 and spec.first == "forced") or (i == len(self.slots) - 1 and spec.last == "forced")

    def _slot_label(self, i: int) -> str:
        q, m, layer = self.slots[i]
        return f"r{q}/{self._labels[m]}/L{layer}"

    def _transition_key(self, a: str, b: str) -> str:
        return f"scale/{self._labels[a]}>{self._labels[b]}"

    def _path_genes(self) -> list[Gene]:
        lo, hi = self.spec.scale_bounds
        picks = tuple(self.routed)
        genes = [
            Gene(f"pick/p{k}", 0.0, 1.0, "route", index=k, kind="choice", choices=picks) for k in range(self.path_depth)
        ]
        if self.spec.scale == "per_slot":
            genes += [Gene(f"scale/p{k}", lo, hi, "route", index=k) for k in range(self.path_depth)]
        return genes

    def _slot_genes(self) -> list[Gene]:
        lo, hi = self.spec.scale_bounds
        n = len(self.slots)
        genes = [
            Gene(f"in/{self._slot_label(i)}", 0.0, 1.0, "route", index=i, kind="bool")
            for i in range(n)
            if not self._forced(i)
        ]
        if self.spec.scale == "per_slot":
            genes += [Gene(f"scale/{self._slot_label(i)}", lo, hi, "route", index=i) for i in range(n)]
        return genes

    def _transition_genes(self) -> list[Gene]:
        if self.spec.scale != "per_transition":
            return []
        lo, hi = self.spec.scale_bounds
        return [Gene(self._transition_key(a, b), lo, hi, "route") for a in self.routed for b in self.routed]

    def fingerprint_data(self) -> dict[str, Any]:
        """What the routing adds to the space's fingerprint."""
        return {"routed": [[n, self.depths[n]] for n in self.routed], "relaxed": self.relaxed}

    # -- points ----------------------------------------------------------------

    @staticmethod
    def _choices(g: Gene) -> list:
        return [False, True] if g.kind == "bool" else list(g.choices)

    def distributions(self) -> dict[str, Any]:
        import optuna

        out: dict[str, Any] = {}
        for g in self.genes:
            if g.kind != "float" and not self.relaxed:
                out[g.name] = optuna.distributions.CategoricalDistribution(self._choices(g))
            else:
                out[g.name] = optuna.distributions.FloatDistribution(g.low, g.high)
        return out

    def suggest(self, trial) -> dict[str, Any]:
        params: dict[str, Any] = {}
        for g in self.genes:
            if g.kind == "float" or self.relaxed:
                params[g.name] = trial.suggest_float(g.name, g.low, g.high)
            else:
                params[g.name] = trial.suggest_categorical(g.name, self._choices(g))
        return params

    def unit_to_params(self, x: list[float]) -> dict[str, Any]:
        """Unit-cube coordinates (clipped) of these genes -> named values:
        flags above 0.5 are on, picks are equal bins."""
        params: dict[str, Any] = {}
        strength: dict[str, float] = {}
        for g, v in zip(self.genes, x):
            v = min(1.0, max(0.0, float(v)))
            if g.kind != "float" and self.relaxed:
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
            try:
                fixed = self.encode(self.decode(params, strength))
            except NotInSpace:
                fixed = {}
            params.update({k: v for k, v in fixed.items() if k.startswith("in/")})
        return params

    def params_to_unit(self, params: dict[str, Any]) -> list[float]:
        x = []
        for g in self.genes:
            if g.name not in params:
                x.append(0.5)
            elif g.kind != "float" and not self.relaxed:
                v = params[g.name]
                x.append((0.75 if v else 0.25) if g.kind == "bool" else (g.choices.index(v) + 0.5) / len(g.choices))
            else:
                x.append((float(params[g.name]) - g.low) / (g.high - g.low))
        return x

    # -- routes --------------------------------------------------------------------

    def decode(self, params: dict[str, Any], strength: dict[str, float] | None = None) -> Route:
        """The route named by ``params``, repaired to the depth bounds: too
        few layers adds the skipped slots with the highest values (pycma's
        ``strength``, or the relaxed values) or else the earliest ones; too
        many drops the lowest valued (or the last)."""
        if self.spec.path is not None:
            picks = [self._pick(self._by_name[f"pick/p{k}"], params) for k in range(self.path_depth)]
            steps = [(m, self._path_layer(m, k), f"scale/p{k}") for k, m in enumerate(picks)]
        else:
            chosen = self._repaired_slots(params, strength)
            steps = [
                (self.slots[i][1], self.slots[i][2], f"scale/{self._slot_label(i)}")
                for i in range(len(self.slots))
                if chosen[i]
            ]
        layers = []
        for k, (model, layer, scale_gene) in enumerate(steps):
            scale = 1.0
            if self.spec.scale == "per_slot":
                scale = float(params[scale_gene])
            elif self.spec.scale == "per_transition" and k:
                scale = float(params[self._transition_key(steps[k - 1][0], model)])
            layers.append(RouteStep(model=model, layer=layer, scale=round(scale, DIGITS)))
        return Route(layers=layers)

    def _path_layer(self, model: str, k: int) -> int:
        """The layer of ``model`` at path position ``k``, scaled to its depth."""
        depth, n = self.path_depth, self.depths[model]
        return min(n - 1, round(k * (n - 1) / (depth - 1))) if depth > 1 else 0

    def _repaired_slots(self, params: dict[str, Any], strength: dict[str, float] | None) -> list[bool]:
        """Whether each slot is included, after repair to the depth bounds."""
        chosen = [
            self._forced(i) or self._flag(self._by_name[f"in/{self._slot_label(i)}"], params)
            for i in range(len(self.slots))
        ]
        free = [i for i in range(len(self.slots)) if not self._forced(i)]

        def rank(i: int) -> float:
            name = f"in/{self._slot_label(i)}"
            if strength and name in strength:
                return strength[name]
            return float(params[name]) if self.relaxed else -i / len(self.slots)

        count = sum(chosen)
        for i in sorted((i for i in free if not chosen[i]), key=rank, reverse=True):
            if count >= self.spec.min_depth:
                break
            chosen[i], count = True, count + 1
        for i in sorted((i for i in free if chosen[i]), key=rank):
            if count <= self.max_depth:
                break
            chosen[i], count = False, count - 1
        return chosen

    def _flag(self, g: Gene, params: dict[str, Any]) -> bool:
        if g.name not in params:
            raise EvomergeError(f"point lacks {g.name!r}; it does not belong to this space")
        v = params[g.name]
        return bool(v) if isinstance(v, bool) else float(v) > 0.5

    def _pick(self, g: Gene, params: dict[str, Any]) -> str:
        if g.name not in params:
            raise EvomergeError(f"point lacks {g.name!r}; it does not belong to this space")
        v = params[g.name]
        if isinstance(v, str):
            return v
        return g.choices[min(len(g.choices) - 1, int(float(v) * len(g.choices)))]

    def encode(self, route: Route) -> dict[str, Any]:
        """A route's named values; raises NotInSpace when these genes cannot
        hold it. Scales of slots (or transitions) the route does not use get
        a neutral value."""
        if route.embed is not None or route.head is not None:
            raise NotInSpace("its route names its own embed or head model, which this space does not search")
        lo, hi = self.spec.scale_bounds
        neutral = 1.0 if lo <= 1.0 <= hi else round((lo + hi) / 2, DIGITS)
        if self.spec.path is not None:
            params = self._encode_path(route.layers)
        else:
            params = self._encode_slots(route.layers, neutral)
        if self.spec.scale == "per_transition":
            params.update(self._encode_transitions(route.layers, neutral))
        return params

    def _encode_path(self, steps: list[RouteStep]) -> dict[str, Any]:
        if len(steps) != self.path_depth:
            raise NotInSpace(f"its route has {len(steps)} layers; this space's path has {self.path_depth}")
        params: dict[str, Any] = {}
        for k, st in enumerate(steps):
            if st.model not in self.routed:
                raise NotInSpace(f"route step {k} runs {st.model}, which this space does not route")
            if self._path_layer(st.model, k) != st.layer:
                raise NotInSpace(
                    f"route step {k} runs layer {st.layer} of {st.model}; path position {k} runs layer "
                    f"{self._path_layer(st.model, k)}"
                )
            params[f"pick/p{k}"] = (self.routed.index(st.model) + 0.5) / len(self.routed) if self.relaxed else st.model
            if self.spec.scale == "per_slot":
                params[f"scale/p{k}"] = st.scale
        return params

    def _encode_slots(self, steps: list[RouteStep], neutral: float) -> dict[str, Any]:
        included, pos = [], 0
        for k, st in enumerate(steps):
            while pos < len(self.slots) and self.slots[pos][1:] != (st.model, st.layer):
                pos += 1
            if pos == len(self.slots):
                raise NotInSpace(
                    f"route step {k} (layer {st.layer} of {st.model}) has no slot left after the earlier steps"
                )
            included.append(pos)
            pos += 1
        last = len(self.slots) - 1
        if included and self._forced(last) and self.slots[last][1:] == (steps[-1].model, steps[-1].layer):
            included[-1] = last  # the same route, with the forced last slot as its end
        params: dict[str, Any] = {}
        for i in range(len(self.slots)):
            on = i in included
            if self._forced(i) and not on:
                raise NotInSpace(f"its route skips slot {self._slot_label(i)}, which this space always includes")
            if not self._forced(i):
                params[f"in/{self._slot_label(i)}"] = (0.75 if on else 0.25) if self.relaxed else on
        if self.spec.scale == "per_slot":
            by_slot = dict(zip(included, (st.scale for st in steps)))
            for i in range(len(self.slots)):
                params[f"scale/{self._slot_label(i)}"] = by_slot.get(i, neutral)
        return params

    def _encode_transitions(self, steps: list[RouteStep], neutral: float) -> dict[str, Any]:
        w: dict[str, float] = {}
        for k in range(1, len(steps)):
            key = self._transition_key(steps[k - 1].model, steps[k].model)
            if w.setdefault(key, steps[k].scale) != steps[k].scale:
                raise NotInSpace(f"its route scales the transition {key[6:]} by both {w[key]} and {steps[k].scale}")
        return {
            key: w.get(key, neutral) for key in (self._transition_key(a, b) for a in self.routed for b in self.routed)
        }


__all__ = [
    "DIGITS",
    "METHOD_GENE",
    "Gene",
    "MergeGenes",
    "NotInSpace",
    "RouteGenes",
    "check_param_names",
    "short_names",
]
