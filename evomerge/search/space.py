"""Search spaces: what a space file says, and the SearchSpace that maps
optimizer points to recipes and back (the only code that does).

This module holds the space file's schema (``SpaceSpec`` and its parts),
``load_space_spec`` and the presets, and ``SearchSpace``, which checks a
space against the sources and composes its merge genes and route genes
(``evomerge.search.genes``) into one list of genes.

A space file names the merge method(s), which of their parameters are
searched and at what granularity, and which are fixed. Parameter names, types
and default ranges come from the methods' own declarations
(``evomerge.engine.methods``); a space may only narrow a range, never restate it.

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
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from evomerge.engine.methods import METHODS, MergeMethod, get_method
from evomerge.engine.recipe import MERGED, Recipe, Source
from evomerge.errors import EvomergeError, field_error
from evomerge.schema import Strict
from evomerge.search.genes import (
    DIGITS,
    METHOD_GENE,
    Gene,
    NotInSpace,
    PathSpec,
    RoutingSpec,
    SearchedParam,
    check_param_names,
)
from evomerge.search.merge_genes import MergeGenes
from evomerge.search.route_genes import RouteGenes

PRESETS = Path(__file__).resolve().parents[2] / "search_spaces"


class SpaceSpec(Strict):
    """A search space as written in YAML."""

    name: str | None = None
    description: str | None = None
    methods: list[str] = []
    routing: RoutingSpec | None = None
    search: dict[str, SearchedParam | None] = {}
    fixed: dict[str, Any] = {}
    dtype: str | None = None


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
    """Maps points to recipes and back for a given set of sources, through its merge genes, route genes or both.

    ``models`` are the models merged (paths as the recipe will name them),
    ``base`` the optional base model, ``num_layers`` their depth; ``depths``
    overrides the depth of routing sources of another depth. ``relaxed``
    gives route flags and picks as floats (Optuna's CMA-ES sampler).
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
        if not spec.methods and spec.routing is None:
            raise EvomergeError(f"{where} lists no methods; name at least one under 'methods' (or add 'routing')")
        if fixed_merge is not None and (spec.methods or spec.routing is None):
            raise EvomergeError(
                f"the config fixes a 'merge' recipe, so {where} may only search routing; remove its 'methods' "
                "(or the config's 'merge')"
            )
        self.methods: list[MergeMethod] = [get_method(m) for m in spec.methods]
        self.merge = self._make_merge(tensor_names)
        self.route = self._make_route(depths or {}, relaxed)
        self.genes: list[Gene] = [*self._merge_genes, *self._route_genes]

    def _make_merge(self, tensor_names: list[str] | None) -> MergeGenes | None:
        if not self.methods:
            # a routing-only space: any parameter it names is a mistake
            check_param_names([], self.spec.search, self.spec.fixed, self.where)
            return None
        return MergeGenes(
            self.methods,
            {name: how or SearchedParam() for name, how in self.spec.search.items()},
            self.spec.fixed,
            models=self.models,
            base=self.base,
            num_layers=self.num_layers,
            tensor_names=tensor_names,
            where=self.where,
            dtype=self.dtype,
            seed=self.seed,
        )

    def _make_route(self, depths: dict[str, int], relaxed: bool) -> RouteGenes | None:
        if self.spec.routing is None:
            return None
        return RouteGenes(
            self.spec.routing,
            models=self.models,
            hybrid=self.hybrid,
            num_layers=self.num_layers,
            depths=depths,
            where=self.where,
            relaxed=relaxed,
        )

    # -- facts ---------------------------------------------------------------

    @property
    def _merge_genes(self) -> list[Gene]:
        return self.merge.genes if self.merge is not None else []

    @property
    def _route_genes(self) -> list[Gene]:
        return self.route.genes if self.route is not None else []

    @property
    def hybrid(self) -> bool:
        """Whether a merge happens before routing (searched or fixed by the config)."""
        return bool(self.methods) or self.fixed_merge is not None

    @property
    def routed(self) -> list[str] | None:
        return self.route.routed if self.route is not None else None

    @property
    def depths(self) -> dict[str, int] | None:
        return self.route.depths if self.route is not None else None

    @property
    def max_depth(self) -> int | None:
        """The most layers a route of this space runs (None without routing)."""
        return self.route.max_depth if self.route is not None else None

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
        if self.route is not None:
            data.update(self.route.fingerprint_data())
        if self.fixed_merge is not None:
            data["fixed_merge"] = self.fixed_merge.fingerprint()
        return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()

    def x0(self) -> list[float]:
        """The centre of the unit cube (pycma's default start)."""
        return [0.5] * self.dim

    def distributions(self) -> dict[str, Any]:
        """Optuna distributions for every gene (the method as a categorical)."""
        out: dict[str, Any] = {}
        for part in self._parts():
            out.update(part.distributions())
        return out

    def _parts(self) -> list[MergeGenes | RouteGenes]:
        return [part for part in (self.merge, self.route) if part is not None]

    # -- points <-> recipes ------------------------------------------------

    def active(self, method: str | None) -> list[Gene]:
        """The genes a recipe of ``method`` uses (the method gene and the
        route's genes included)."""
        merge = self.merge.active(method) if self.merge is not None else []
        return [*merge, *self._route_genes]

    def suggest(self, trial) -> Recipe:
        """Ask an Optuna trial for a point (define-by-run) and decode it."""
        params: dict[str, Any] = {}
        for part in self._parts():
            params.update(part.suggest(trial))
        return self.decode_params(params)

    def unit_to_params(self, x) -> dict[str, Any]:
        """Unit-cube vector -> named values (the method picked by bins)."""
        if len(x) != self.dim:
            raise ValueError(f"point has {len(x)} coordinates, the space {self.dim}")
        n = len(self._merge_genes)
        params: dict[str, Any] = {}
        if self.merge is not None:
            params.update(self.merge.unit_to_params(x[:n]))
        if self.route is not None:
            params.update(self.route.unit_to_params(x[n:]))
        return params

    def params_to_unit(self, params: dict[str, Any]) -> list[float]:
        """Named values -> unit-cube vector (unused genes at the centre)."""
        return [v for part in self._parts() for v in part.params_to_unit(params)]

    def decode(self, x) -> Recipe:
        return self.decode_params(self.unit_to_params(x))

    def decode_params(self, params: dict[str, Any]) -> Recipe:
        """Named values (as Optuna stores them) -> the recipe they stand for."""
        if self.route is None:
            return self.merge.decode(params)
        route = self.route.decode(params)
        common = {"dtype": self.dtype, "seed": self.seed, "route": route}
        if self.merge is not None:
            merge = self.merge.decode(params)
            return Recipe(**{**merge.model_dump(exclude={"route", "metadata"}), **common})
        if self.fixed_merge is not None:
            inputs = {s.model for s in self.fixed_merge.sources}
            extra = [Source(model=m) for m in self.routed if m != MERGED and m not in inputs]
            route = route.model_copy(update={"models": extra or None})
            return Recipe(**{**self.fixed_merge.model_dump(exclude={"route", "metadata"}), "route": route})
        return Recipe(sources=[Source(model=m) for m in self.routed], **common)

    def encode(self, recipe: Recipe) -> dict[str, Any] | None:
        """A recipe's named values, or None when this space cannot express it
        exactly (another method, models, fixed values or a finer structure);
        ``why_not`` says which."""
        return self.try_encode(recipe)[0]

    def why_not(self, recipe: Recipe) -> str | None:
        """Why this space cannot express ``recipe`` (None when it can)."""
        return self.try_encode(recipe)[1]

    def try_encode(self, recipe: Recipe) -> tuple[dict[str, Any] | None, str | None]:
        """``(params, None)`` for a recipe this space expresses exactly, else ``(None, reason)``."""
        try:
            return self._encode(recipe), None
        except NotInSpace as e:
            return None, str(e)

    def _encode(self, recipe: Recipe) -> dict[str, Any]:
        """The recipe's named values; raises NotInSpace unless they decode
        back to the very same recipe."""
        params = self._encode_parts(recipe)
        try:
            back = self.decode_params(params)
        except EvomergeError as e:
            raise NotInSpace(f"its values do not decode in this space ({e})") from None
        if back.fingerprint() != recipe.fingerprint():
            at = _first_difference(recipe.canonical(), back.canonical())
            raise NotInSpace(f"decoding its values gives another recipe, differing at {at}; the space sets that itself")
        return params

    def _encode_parts(self, recipe: Recipe) -> dict[str, Any]:
        if self.route is None:
            return self.merge.encode(recipe)
        if recipe.route is None:
            raise NotInSpace("it has no route, and this space searches routing")
        params = self.route.encode(recipe.route)
        if self.merge is not None:
            return {**self.merge.encode(recipe.merge_part()), **params}
        if self.fixed_merge is not None:
            merge = recipe.merge_part()
            if merge is None or merge.fingerprint() != self.fixed_merge.fingerprint():
                raise NotInSpace("its merge is not the merge the config fixes")
            return params
        if recipe.method is not None:
            raise NotInSpace(f"it merges with {recipe.method!r} before routing; this space only routes")
        return params


def _first_difference(a: Any, b: Any, at: str = "") -> str:
    """Where two canonical recipes first differ, as a dotted path."""
    if isinstance(a, dict) and isinstance(b, dict):
        for key in sorted(set(a) | set(b)):
            if a.get(key) != b.get(key):
                return _first_difference(a.get(key), b.get(key), f"{at}.{key}" if at else key)
    elif isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
        for i, (x, y) in enumerate(zip(a, b)):
            if x != y:
                return _first_difference(x, y, f"{at}.{i}" if at else str(i))
    return at or "the top level"


def preset_names() -> list[str]:
    """The names of the bundled search-space presets."""
    return sorted(p.stem for p in PRESETS.glob("*.yaml"))


__all__ = [
    "SearchSpace",
    "SpaceSpec",
    "SearchedParam",
    "RoutingSpec",
    "PathSpec",
    "Gene",
    "MergeGenes",
    "RouteGenes",
    "NotInSpace",
    "DIGITS",
    "METHOD_GENE",
    "load_space_spec",
    "preset_names",
    "METHODS",
]
