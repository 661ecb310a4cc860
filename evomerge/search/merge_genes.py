"""The merge half of a search space: which method, and the values of its
searched parameters per model, module group and depth (``MergeGenes``), and
the checks of a space file's merge part against the sources."""

from __future__ import annotations

import math
from typing import Any

from evomerge.engine.methods import MergeMethod, get_method
from evomerge.engine.recipe import Conditional, Recipe, Source
from evomerge.errors import EvomergeError
from evomerge.search.genes import (
    DIGITS,
    METHOD_GENE,
    Gene,
    NotInSpace,
    SearchedParam,
    check_param_names,
    in_words,
    number,
    short_names,
)


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
            check_fit(self, m)
        check_param_names(methods, search, fixed, where)
        for name, how in search.items():
            check_searched(self, name, how, tensor_names)
        check_required_and_fixed(self)
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

    def searches(self, method: MergeMethod, name: str) -> bool:
        """Whether this space searches ``name`` for ``method``."""
        return name in self.search and name in method.param_names and method.param(name).searchable

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
                if self.searches(m, name):
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
            elif self.searches(method, p.name):
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
            return number(setting, whose)
        if how.per == "gradient" and len(setting) == how.points:
            return number(setting[g.index], whose)
        if how.per == "layer" and len(setting) == self.num_layers:
            return number(setting[g.index], whose)
        if how.per == "block" and len(setting) == self.num_layers:
            block = setting[g.index * how.block : (g.index + 1) * how.block]
            if any(v != block[0] for v in block):
                raise NotInSpace(f"{whose} varies within the block of {g.name}")
            return number(block[0], whose)
        raise NotInSpace(f"{whose} has {len(setting)} values, which do not fit its search per {how.per}")


# -- checks of a space file against its sources ------------------------------


def check_fit(genes: MergeGenes, method: MergeMethod) -> None:
    refs, base = genes.inputs(method)
    n = method.max_inputs
    if method.base_is_endpoint and n is not None and len(genes.models) > n:
        raise EvomergeError(
            f"{genes.where}: {method.name} merges exactly {in_words(n)} models, but the config lists "
            f"{len(genes.models)}; list {in_words(n)} models or use another method"
        )
    try:
        method.check_inputs(len(refs), base is not None)
    except EvomergeError as e:
        raise EvomergeError(f"{genes.where} does not fit the sources: {e}") from None


def check_searched(genes: MergeGenes, name: str, how: SearchedParam, tensor_names: list[str] | None) -> None:
    at = genes.where
    # In a choice, a searched name is searched for each method that can
    # search it; one that declares it otherwise keeps its own default.
    declaring = [m for m in genes.methods if name in m.param_names]
    if not any(m.param(name).searchable for m in declaring):
        raise EvomergeError(f"{at}: {name!r} of {declaring[0].name} is not a searchable number; move it to 'fixed'")
    if how.per == "block" and not how.block:
        raise EvomergeError(f"{at}: {name} is searched per block; set 'block' (layers per block)")
    if how.per == "gradient" and not how.points:
        raise EvomergeError(f"{at}: {name} is searched as a gradient; set 'points'")
    if how.per in ("layer", "block", "gradient") and genes.num_layers < 1:
        raise EvomergeError(f"{at}: {name} is searched per layer, but the sources have no layers")
    if how.per == "block" and how.block > genes.num_layers:
        raise EvomergeError(
            f"{at}: block of {how.block} layers for {name} exceeds the sources' "
            f"{genes.num_layers} layers; use a smaller block"
        )
    if how.per == "gradient" and how.points > genes.num_layers:
        raise EvomergeError(
            f"{at}: {how.points} gradient points for {name} exceed the sources' "
            f"{genes.num_layers} layers; use fewer points"
        )
    if how.bounds is not None:
        check_bounds(genes, name, how.bounds)
    if how.groups is not None:
        check_groups(genes, name, how.groups, tensor_names)


def check_bounds(genes: MergeGenes, name: str, bounds: tuple[float, float]) -> None:
    lo, hi = bounds
    if not (math.isfinite(lo) and math.isfinite(hi)) or lo >= hi:
        raise EvomergeError(
            f"{genes.where}: bounds {list(bounds)} of {name} are empty or reversed; write [low, high] with low < high"
        )
    for m in genes.methods:
        if not genes.searches(m, name):
            continue
        dlo, dhi = m.param(name).bounds
        if lo < dlo or hi > dhi:
            raise EvomergeError(
                f"{genes.where}: bounds {list(bounds)} of {name} are outside the range "
                f"{m.name} declares, [{dlo}, {dhi}]; a space may only narrow it"
            )


def check_groups(genes: MergeGenes, name: str, groups: list[str], tensor_names: list[str] | None) -> None:
    if not groups or len(set(groups)) != len(groups):
        raise EvomergeError(f"{genes.where}: groups of {name} must be distinct filters; fix the list")
    if tensor_names is None:
        return
    for g in groups:
        if not any(g in t for t in tensor_names):
            raise EvomergeError(
                f"{genes.where}: group {g!r} of {name} matches no tensor of the sources; "
                "use a substring of their tensor names (e.g. self_attn, mlp)"
            )


def check_required_and_fixed(genes: MergeGenes) -> None:
    for m in genes.methods:
        for p in m.params:
            if p.required and not genes.searches(m, p.name) and p.name not in genes.fixed:
                raise EvomergeError(f"{genes.where}: {m.name} needs {p.name!r}; add it under 'search' or 'fixed'")
        for name, value in genes.fixed.items():
            if name in m.param_names:
                for leaf in value if isinstance(value, list) else [value]:
                    m.param(name).validate(leaf, f"{genes.where} fixed")


__all__ = ["MergeGenes"]
