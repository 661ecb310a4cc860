"""The routing half of a search space: which layer slots a route runs, or
which model each position of a fixed-depth path takes, and the scales of the
steps (``RouteGenes``); a route encoded back into its values."""

from __future__ import annotations

import math
from typing import Any

from evomerge.engine.recipe import MERGED, Route, RouteStep
from evomerge.errors import EvomergeError
from evomerge.search.genes import (
    DIGITS,
    Gene,
    NotInSpace,
    RoutingSpec,
    short_names,
)


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
            params = _encode_path(self, route.layers)
        else:
            params = _encode_slots(self, route.layers, neutral)
        if self.spec.scale == "per_transition":
            params.update(_encode_transitions(self, route.layers, neutral))
        return params


# -- a route back into named values ------------------------------------------


def _encode_path(genes: RouteGenes, steps: list[RouteStep]) -> dict[str, Any]:
    if len(steps) != genes.path_depth:
        raise NotInSpace(f"its route has {len(steps)} layers; this space's path has {genes.path_depth}")
    params: dict[str, Any] = {}
    for k, st in enumerate(steps):
        if st.model not in genes.routed:
            raise NotInSpace(f"route step {k} runs {st.model}, which this space does not route")
        if genes._path_layer(st.model, k) != st.layer:
            raise NotInSpace(
                f"route step {k} runs layer {st.layer} of {st.model}; path position {k} runs layer "
                f"{genes._path_layer(st.model, k)}"
            )
        params[f"pick/p{k}"] = (genes.routed.index(st.model) + 0.5) / len(genes.routed) if genes.relaxed else st.model
        if genes.spec.scale == "per_slot":
            params[f"scale/p{k}"] = st.scale
    return params


def _encode_slots(genes: RouteGenes, steps: list[RouteStep], neutral: float) -> dict[str, Any]:
    included, pos = [], 0
    for k, st in enumerate(steps):
        while pos < len(genes.slots) and genes.slots[pos][1:] != (st.model, st.layer):
            pos += 1
        if pos == len(genes.slots):
            raise NotInSpace(
                f"route step {k} (layer {st.layer} of {st.model}) has no slot left after the earlier steps"
            )
        included.append(pos)
        pos += 1
    last = len(genes.slots) - 1
    if included and genes._forced(last) and genes.slots[last][1:] == (steps[-1].model, steps[-1].layer):
        included[-1] = last  # the same route, with the forced last slot as its end
    params: dict[str, Any] = {}
    for i in range(len(genes.slots)):
        on = i in included
        if genes._forced(i) and not on:
            raise NotInSpace(f"its route skips slot {genes._slot_label(i)}, which this space always includes")
        if not genes._forced(i):
            params[f"in/{genes._slot_label(i)}"] = (0.75 if on else 0.25) if genes.relaxed else on
    if genes.spec.scale == "per_slot":
        by_slot = dict(zip(included, (st.scale for st in steps)))
        for i in range(len(genes.slots)):
            params[f"scale/{genes._slot_label(i)}"] = by_slot.get(i, neutral)
    return params


def _encode_transitions(genes: RouteGenes, steps: list[RouteStep], neutral: float) -> dict[str, Any]:
    w: dict[str, float] = {}
    for k in range(1, len(steps)):
        key = genes._transition_key(steps[k - 1].model, steps[k].model)
        if w.setdefault(key, steps[k].scale) != steps[k].scale:
            raise NotInSpace(f"its route scales the transition {key[6:]} by both {w[key]} and {steps[k].scale}")
    return {
        key: w.get(key, neutral) for key in (genes._transition_key(a, b) for a in genes.routed for b in genes.routed)
    }


__all__ = ["RouteGenes"]
