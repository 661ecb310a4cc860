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
    bin_centre,
    check_param_names,
    equal_bin,
    in_words,
    number,
    short_names,
    value_in,
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
        self.names = [method.name for method in methods]
        self.search = search  # every value a SearchedParam (None already replaced)
        self.fixed = fixed
        self.models = models
        self.base = base
        self.num_layers = num_layers
        self.where = where
        self.dtype = dtype
        self.seed = seed
        for method in methods:
            check_fit(self, method)
        check_param_names(methods, search, fixed, where)
        for name, how in search.items():
            check_searched(self, name, how, tensor_names)
        check_required_and_fixed(self)
        self.genes = self._build_genes()

    # -- construction ------------------------------------------------------

    @property
    def is_choice(self) -> bool:
        """Whether the method itself is searched (the space lists several)."""
        return len(self.methods) > 1

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

    def _build_genes(self) -> list[Gene]:
        """Every method's genes, in the order of ``search``, after the method gene of a choice."""
        genes: list[Gene] = []
        labels = short_names(self.models + ([self.base] if self.base else []))
        for name, how in self.search.items():
            for method in self.methods:
                if self.searches(method, name):
                    genes += self._param_genes(method, name, how, labels)
        if not genes:
            # A choice may hold methods with nothing to search (karcher,
            # arcee_fusion, ram), but not only those: the method alone is one
            # categorical coordinate, which pycma cannot search.
            if self.is_choice:
                raise EvomergeError(
                    f"{self.where} searches only which method to use; "
                    "list under 'search' a parameter of at least one of its methods"
                )
            raise EvomergeError(f"{self.where} searches nothing; list parameters under 'search'")
        if self.is_choice:
            genes.insert(0, Gene(METHOD_GENE, 0.0, 1.0))
        return genes

    def _param_genes(self, method: MergeMethod, name: str, how: SearchedParam, labels: dict[str, str]) -> list[Gene]:
        """The genes of one searched parameter of one method, named
        ``[method.]param[/model][/group][/depth slot]``."""
        param = method.param(name)
        low, high = how.bounds or param.bounds
        refs, base = self.inputs(method)
        owners: list[str | None]
        if param.scope == "per_model":
            owners = [ref for ref in refs if ref != base]
        elif param.scope == "per_input":
            owners = list(refs)
        else:
            owners = [None]
        groups = [*how.groups, ""] if how.groups else [None]
        prefix = f"{method.name}." if self.is_choice else ""
        genes = []
        for owner in owners:
            for group in groups:
                for index, slot in enumerate(depth_slots(how, self.num_layers)):
                    parts = [f"{prefix}{name}"]
                    if owner is not None:
                        parts.append(labels[owner])
                    if group is not None:
                        parts.append(group or "rest")
                    if slot:
                        parts.append(slot)
                    genes.append(Gene("/".join(parts), low, high, name, method.name, owner, group, index))
        return genes

    # -- points ----------------------------------------------------------------

    def method_of(self, params: dict[str, Any]) -> MergeMethod:
        """The method a point chooses (the only one, outside a choice)."""
        if METHOD_GENE in params:
            return get_method(params[METHOD_GENE])
        return self.methods[0]

    def active(self, method: str | None) -> list[Gene]:
        """The genes a recipe of ``method`` uses (the method gene included)."""
        return [gene for gene in self.genes if gene.name == METHOD_GENE or gene.method == method]

    def distributions(self) -> dict[str, Any]:
        """Optuna distributions of every gene: the method a categorical, the rest floats."""
        import optuna

        out: dict[str, Any] = {}
        for gene in self.genes:
            if gene.name == METHOD_GENE:
                out[gene.name] = optuna.distributions.CategoricalDistribution(self.names)
            else:
                out[gene.name] = optuna.distributions.FloatDistribution(gene.low, gene.high)
        return out

    def suggest(self, trial) -> dict[str, Any]:
        """Ask an Optuna trial for the method, then for that method's genes only."""
        params: dict[str, Any] = {}
        if self.is_choice:
            params[METHOD_GENE] = trial.suggest_categorical(METHOD_GENE, self.names)
        for gene in self.active(self.method_of(params).name):
            if gene.name != METHOD_GENE:
                params[gene.name] = trial.suggest_float(gene.name, gene.low, gene.high)
        return params

    def unit_to_params(self, x: list[float]) -> dict[str, Any]:
        """Unit-cube coordinates (clipped) of these genes -> the named values
        of the chosen method's genes (the method picked by equal bins)."""
        params: dict[str, Any] = {}
        for gene, coordinate in zip(self.genes, x):
            unit = min(1.0, max(0.0, float(coordinate)))
            if gene.name == METHOD_GENE:
                params[gene.name] = self.names[equal_bin(unit, len(self.methods))]
            else:
                params[gene.name] = gene.from_unit(unit)
        keep = {gene.name for gene in self.active(self.method_of(params).name)}
        return {name: value for name, value in params.items() if name in keep}

    def params_to_unit(self, params: dict[str, Any]) -> list[float]:
        """Named values -> unit-cube coordinates: the method at its bin's
        centre, the other methods' genes at the centre of the cube."""
        x = []
        for gene in self.genes:
            if gene.name == METHOD_GENE:
                x.append(bin_centre(self.names.index(params[gene.name]), len(self.methods)))
            elif gene.name in params:
                x.append(gene.to_unit(params[gene.name]))
            else:
                x.append(0.5)
        return x

    # -- recipes -----------------------------------------------------------------

    def decode(self, params: dict[str, Any]) -> Recipe:
        """Named values -> the merge recipe they stand for."""
        method = self.method_of(params)
        refs, base = self.inputs(method)
        per_model: dict[str, dict[str, Any]] = {ref: {} for ref in refs}
        shared: dict[str, Any] = {}
        for param in method.params:
            if param.name in self.fixed:
                settings = self._fixed_settings(param.name, param.scope, refs, base)
            elif self.searches(method, param.name):
                settings = self._searched_settings(method, param.name, params)
            else:
                continue
            for owner, value in settings.items():
                (shared if owner is None else per_model[owner])[param.name] = value
        return Recipe(
            method=method.name,
            sources=[Source(model=ref, parameters=per_model[ref] or None) for ref in refs],
            base_model=base if method.base != "ignored" else None,
            parameters=shared or None,
            dtype=self.dtype,
            seed=self.seed,
        )

    def _fixed_settings(self, name: str, scope: str, refs: list[str], base: str | None) -> dict[str | None, Any]:
        """Each owner's setting of a fixed parameter: the same value for all."""
        if scope == "shared":
            owners: list[str | None] = [None]
        else:
            owners = [ref for ref in refs if scope == "per_input" or ref != base]
        return {owner: self.fixed[name] for owner in owners}

    def _searched_settings(self, method: MergeMethod, name: str, params: dict[str, Any]) -> dict[str | None, Any]:
        """Each owner's (a model, or None for shared) setting of a searched
        parameter: a number, a list along the depth, or per-group conditionals."""
        how = self.search[name]
        genes = [gene for gene in self.active(method.name) if gene.param == name]
        out: dict[str | None, Any] = {}
        for owner in dict.fromkeys(gene.model for gene in genes):
            owned = [gene for gene in genes if gene.model == owner]
            settings = []
            for group in dict.fromkeys(gene.group for gene in owned):
                along = sorted((gene for gene in owned if gene.group == group), key=lambda gene: gene.index)
                values = [round(float(value_in(params, gene)), DIGITS) for gene in along]
                settings.append((group, spread_along_depth(how, values, self.num_layers)))
            if settings[0][0] is None:
                out[owner] = settings[0][1]
            else:
                out[owner] = [Conditional(value=value, filter=group or None) for group, value in settings]
        return out

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
        if self.is_choice:
            params[METHOD_GENE] = recipe.method
        by_model = {source.model: source.parameters or {} for source in recipe.sources}
        for gene in self.active(method.name):
            if gene.name == METHOD_GENE:
                continue
            if gene.model is not None and gene.model not in by_model:
                raise NotInSpace(f"it does not merge {gene.model}, which this space does")
            owner_settings = (recipe.parameters or {}) if gene.model is None else by_model[gene.model]
            setting = owner_settings.get(gene.param)
            if setting is None:
                setting = method.param(gene.param).default
            value = value_from_setting(gene, setting, self.search[gene.param], self.num_layers)
            if not gene.low <= value <= gene.high:
                raise NotInSpace(f"{gene.name} = {value} is outside the space's range [{gene.low}, {gene.high}]")
            params[gene.name] = value
        return params


# -- the layout of values along the depth ----------------------------------


def depth_slots(how: SearchedParam, num_layers: int) -> list[str]:
    """The name suffix of each value along the depth ("" for one value)."""
    if how.per == "global":
        return [""]
    if how.per == "layer":
        return [f"L{i}" for i in range(num_layers)]
    if how.per == "block":
        count = math.ceil(num_layers / how.block)
        spans = [(i * how.block, min(num_layers, (i + 1) * how.block) - 1) for i in range(count)]
        return [f"L{first}" if first == last else f"L{first}-{last}" for first, last in spans]
    return [f"g{i}" for i in range(how.points)]


def spread_along_depth(how: SearchedParam, values: list[float], num_layers: int) -> Any:
    """A parameter's setting from its values along the depth: blocks become
    one value per layer, and equal values one number."""
    if how.per == "block":
        values = [values[i // how.block] for i in range(num_layers)]
    if len(set(values)) == 1:
        return values[0]
    return values


def value_from_setting(gene: Gene, setting: Any, how: SearchedParam, num_layers: int) -> float:
    """The value ``gene`` takes from a recipe's setting of its parameter;
    raises NotInSpace when the setting has another shape."""
    whose = gene.param if gene.model is None else f"{gene.param} of {gene.model}"
    if isinstance(setting, list) and setting and isinstance(setting[0], Conditional):
        match = [cond for cond in setting if (cond.filter or "") == (gene.group or "")]
        if not match:
            raise NotInSpace(f"{whose} has no value for the module group {gene.group or 'rest'!r} of {gene.name}")
        setting = match[0].value
    elif isinstance(setting, Conditional):
        raise NotInSpace(f"{whose} is one filtered value, which this space does not search")
    if not isinstance(setting, list):
        return number(setting, whose)
    if how.per == "gradient" and len(setting) == how.points:
        return number(setting[gene.index], whose)
    if how.per == "layer" and len(setting) == num_layers:
        return number(setting[gene.index], whose)
    if how.per == "block" and len(setting) == num_layers:
        block = setting[gene.index * how.block : (gene.index + 1) * how.block]
        if any(value != block[0] for value in block):
            raise NotInSpace(f"{whose} varies within the block of {gene.name}")
        return number(block[0], whose)
    raise NotInSpace(f"{whose} has {len(setting)} values, which do not fit its search per {how.per}")


# -- checks of a space file against its sources ------------------------------


def check_fit(genes: MergeGenes, method: MergeMethod) -> None:
    """Refuse a method that cannot merge these sources (their count, a base)."""
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
    """Refuse a searched parameter whose granularity, bounds or groups do not fit."""
    at = genes.where
    # In a choice, a searched name is searched for each method that can
    # search it; one that declares it otherwise keeps its own default.
    declaring = [method for method in genes.methods if name in method.param_names]
    if not any(method.param(name).searchable for method in declaring):
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
    """Refuse bounds that are empty or wider than a method declares."""
    low, high = bounds
    if not (math.isfinite(low) and math.isfinite(high)) or low >= high:
        raise EvomergeError(
            f"{genes.where}: bounds {list(bounds)} of {name} are empty or reversed; write [low, high] with low < high"
        )
    for method in genes.methods:
        if not genes.searches(method, name):
            continue
        declared_low, declared_high = method.param(name).bounds
        if low < declared_low or high > declared_high:
            raise EvomergeError(
                f"{genes.where}: bounds {list(bounds)} of {name} are outside the range "
                f"{method.name} declares, [{declared_low}, {declared_high}]; a space may only narrow it"
            )


def check_groups(genes: MergeGenes, name: str, groups: list[str], tensor_names: list[str] | None) -> None:
    """Refuse module groups that repeat or match no tensor of the sources."""
    if not groups or len(set(groups)) != len(groups):
        raise EvomergeError(f"{genes.where}: groups of {name} must be distinct filters; fix the list")
    if tensor_names is None:
        return
    for group in groups:
        if not any(group in tensor for tensor in tensor_names):
            raise EvomergeError(
                f"{genes.where}: group {group!r} of {name} matches no tensor of the sources; "
                "use a substring of their tensor names (e.g. self_attn, mlp)"
            )


def check_required_and_fixed(genes: MergeGenes) -> None:
    """Refuse a required parameter neither searched nor fixed, and invalid fixed values."""
    for method in genes.methods:
        for param in method.params:
            if param.required and not genes.searches(method, param.name) and param.name not in genes.fixed:
                raise EvomergeError(
                    f"{genes.where}: {method.name} needs {param.name!r}; add it under 'search' or 'fixed'"
                )
        for name, value in genes.fixed.items():
            if name in method.param_names:
                for leaf in value if isinstance(value, list) else [value]:
                    method.param(name).validate(leaf, f"{genes.where} fixed")


__all__ = ["MergeGenes"]
