"""Data-flow recipes: run layers of several models in a chosen order.

A route is a list of steps ``(model, layer, scale)``: the hidden state passes
through ``layer`` of ``model`` after being multiplied by ``scale`` (the input
scaling of the Evolutionary Model Merge paper). Embeddings, the final norm and
the LM head come from ``route.embed`` and ``route.head`` (default: the first
and the last step's model, as in mergekit's passthrough).

In memory (``Router``), a routed model is a host model of the sources'
architecture whose layer list *refers to* the sources' decoder layers: no
weight is copied, and assembling a candidate takes microseconds to
milliseconds. Each step is wrapped in a ``RoutedLayer`` that scales the input
and points the attention at the step's own KV-cache slot, so a layer that
appears twice keeps two caches and generation works.

Export (``routed_state``) writes a plain model of the same architecture with
``num_hidden_layers`` equal to the route's length. Scales fold exactly into
the weights of pre-norm models whose norms are scale-invariant (RMSNorm):

    routed step k:   u = s_k h,  h' = u + A(u) + M(u + A(u))
    exported step k: g' = g + a_k A(g) + a_k M(g + a_k A(g))

where ``A`` and ``M`` begin with a norm, so ``A(c u) = A(u)`` for c > 0. With
``g = c h`` and ``a_k = c / s_k`` the exported stream is ``g' = a_k h'``; by
induction ``a_k = 1 / (s_1 ... s_k)``, multiplied into the output projections
(``o_proj``, ``down_proj``, weights and biases) of step k, and the final norm
removes the last factor. The one inexact term is the norms' epsilon, which
sees a stream scaled by ``a_k``: ``routed_state`` compares the exported
model's logits with the routed model's and refuses when they differ.

``RouteMerger`` runs whole data-flow recipes: a recipe's parameter-space
merge goes through evomerge.engine.plan's ``InPlaceMerger`` and becomes the source
``merge``; exports are written by evomerge.engine.folder. This module builds on
those and never on evomerge.engine.merge, whose ``merge_to_disk`` sends routed
recipes here.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from evomerge.engine.devices import parse_devices, place
from evomerge.engine.folder import check_output_folder, pinned, write_model_folder
from evomerge.engine.inplace import InPlaceMerger, build_model
from evomerge.engine.plan import open_sources, torch_dtype
from evomerge.engine.recipe import MERGED, Recipe, Source
from evomerge.errors import EvomergeError

if TYPE_CHECKING:
    from evomerge.engine.recipe import Route

# Architectures whose decoder layers are pre-norm with RMSNorm and whose
# residual branches end in these projections: exact folding holds for them.
FOLDABLE = {"llama": ("o_proj", "down_proj"), "mistral": ("o_proj", "down_proj"), "qwen2": ("o_proj", "down_proj")}
FOLDABLE["qwen3"] = FOLDABLE["llama"]
# Config keys that may differ between routing sources (depth and its lists).
_DEPTH_KEYS = {"num_hidden_layers", "layer_types", "max_window_layers", "_name_or_path", "architectures", "dtype"}
_IGNORED_KEYS = {"transformers_version", "torch_dtype", "use_cache", "output_attentions", "output_hidden_states"}


class RoutedLayer(nn.Module):
    """One route step: a shared decoder layer, its input scale, its cache slot."""

    def __init__(self, layer: nn.Module, slot: int, scale: float):
        super().__init__()
        self.layer = layer  # shared with the source model, not a copy
        self.slot = slot
        self.scale = float(scale)
        self.attention_type = getattr(layer, "attention_type", "full_attention")

    def forward(self, hidden_states: torch.Tensor, *args: Any, **kwargs: Any):
        # The attention reads its layer_idx to pick its KV-cache entry; a
        # layer used at several steps must write each step's cache apart.
        # The layer is the source model's own: its index is put back after
        # the call, or the source (used alone, with a cache) would write two
        # of its layers into one cache entry.
        attn = self.layer.self_attn
        own = attn.layer_idx
        attn.layer_idx = self.slot
        try:
            if self.scale != 1.0:
                hidden_states = hidden_states * self.scale
            return self.layer(hidden_states, *args, **kwargs)
        finally:
            attn.layer_idx = own


def _plain(config) -> dict[str, Any]:
    return {k: v for k, v in config.to_dict().items() if k not in _DEPTH_KEYS | _IGNORED_KEYS}


def check_same_width(configs: dict[str, dict[str, Any]]) -> None:
    """Refuse routing sources (model reference -> config.json) of different
    hidden sizes, before any of them is loaded."""
    sizes = {ref: cfg.get("hidden_size") for ref, cfg in configs.items()}
    if len(set(sizes.values())) > 1:
        a = next(iter(sizes))
        b = next(r for r in sizes if sizes[r] != sizes[a])
        raise EvomergeError(
            f"models {a} and {b} have different hidden sizes ({sizes[a]} and {sizes[b]}); a route passes one hidden "
            "state between layers, so route models of one hidden size"
        )


def _layers(model: nn.Module) -> nn.ModuleList:
    inner = getattr(model, "model", None)
    layers = getattr(inner, "layers", None)
    if not isinstance(layers, nn.ModuleList):
        raise EvomergeError(
            f"{type(model).__name__} has no model.layers list; layer routing supports decoder-only "
            "Llama-style models (llama, mistral, qwen2, qwen3)"
        )
    return layers


class Router:
    """Assembles routed models from live source models, sharing their layers.

    ``pool`` maps a model name (as routes name it) to a live causal LM. All
    must have the same architecture and the same configuration apart from
    depth; their hidden sizes must match. ``max_depth`` bounds any route.
    """

    def __init__(self, pool: dict[str, nn.Module], max_depth: int | None = None):
        if not pool:
            raise EvomergeError("layer routing needs at least one source model; list the models to route")
        self.pool = dict(pool)
        first_name, first = next(iter(self.pool.items()))
        cfg = first.config
        for name, model in self.pool.items():
            other = model.config
            if other.model_type != cfg.model_type:
                raise EvomergeError(
                    f"routing sources {first_name} ({cfg.model_type}) and {name} ({other.model_type}) have "
                    "different architectures; route models of one architecture"
                )
            check_same_width({first_name: {"hidden_size": cfg.hidden_size}, name: {"hidden_size": other.hidden_size}})
            a, b = _plain(cfg), _plain(other)
            diff = sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))
            if diff:
                raise EvomergeError(
                    f"routing sources {first_name} and {name} differ in config {diff[0]!r} "
                    f"({a.get(diff[0])!r} and {b.get(diff[0])!r}); route models that differ only in depth"
                )
            _layers(model)
        self.depths = {name: len(_layers(m)) for name, m in self.pool.items()}
        self.max_depth = max_depth
        # The host: a shell of the architecture whose modules are all
        # borrowed from the sources at assembly. Built once, on the meta
        # device, so it owns no weights.
        self._config = copy.deepcopy(cfg)
        with torch.device("meta"):
            host_cfg = copy.deepcopy(cfg)
            host_cfg.num_hidden_layers = 1
            if getattr(host_cfg, "layer_types", None) is not None:
                host_cfg.layer_types = host_cfg.layer_types[:1]
            self.host = type(first)(host_cfg)
        self.host.eval()
        self.route: Route | None = None

    # -- checks ---------------------------------------------------------------

    def check(self, route: Route) -> None:
        """Refuse a route that is empty, too deep, or names unknown layers."""
        if not route.layers:
            raise EvomergeError("the route is empty; a route needs at least one layer")
        if self.max_depth is not None and len(route.layers) > self.max_depth:
            raise EvomergeError(
                f"the route has {len(route.layers)} layers, more than the maximum depth {self.max_depth}; "
                "shorten it or raise max_depth"
            )
        for i, step in enumerate(route.layers):
            if step.model not in self.pool:
                raise EvomergeError(
                    f"route step {i} uses model {step.model!r}, which is not a routing source; "
                    f"use one of {', '.join(self.pool)}"
                )
            if not 0 <= step.layer < self.depths[step.model]:
                raise EvomergeError(
                    f"route step {i} uses layer {step.layer} of {step.model}, which has "
                    f"{self.depths[step.model]} layers; use a layer index below that"
                )
            if not step.scale > 0:
                raise EvomergeError(f"route step {i} has scale {step.scale}; scales must be positive")
        for key, name in zip(("embed", "head"), self.ends(route)):
            if name not in self.pool:
                raise EvomergeError(
                    f"route {key} model {name!r} is not a routing source; use one of {', '.join(self.pool)}"
                )

    def ends(self, route: Route) -> tuple[str, str]:
        """The models giving the embeddings, and the final norm and head."""
        embed = route.embed or route.layers[0].model
        return embed, route.head or route.layers[-1].model

    @property
    def tied(self) -> bool:
        return bool(getattr(self._config, "tie_word_embeddings", False))

    # -- assembly -------------------------------------------------------------

    def config_for(self, route: Route):
        """The host's config for a route: the sources' config at the route's depth."""
        cfg = copy.copy(self._config)
        cfg.num_hidden_layers = len(route.layers)
        if getattr(cfg, "layer_types", None) is not None:
            types = []
            for step in route.layers:
                layer = _layers(self.pool[step.model])[step.layer]
                types.append(
                    getattr(layer, "attention_type", None) or self.pool[step.model].config.layer_types[step.layer]
                )
            cfg.layer_types = types
        return cfg

    @torch.no_grad()
    def assemble(self, route: Route) -> nn.Module:
        """Point the host's layers at ``route``'s steps and return the host.

        The host is one object, rebuilt in place for every route, so an
        lm-eval wrapper made around it stays valid."""
        self.check(route)
        embed, head = (self.pool[n] for n in self.ends(route))
        host = self.host
        host.config = self.config_for(route)
        host.model.config = host.config
        host.model.embed_tokens = embed.model.embed_tokens
        host.model.rotary_emb = embed.model.rotary_emb
        host.model.norm = head.model.norm
        host.lm_head = embed.lm_head if self.tied else head.lm_head
        host.model.layers = nn.ModuleList(
            RoutedLayer(_layers(self.pool[s.model])[s.layer], i, s.scale) for i, s in enumerate(route.layers)
        )
        if hasattr(host.model, "has_sliding_layers"):
            host.model.has_sliding_layers = "sliding_attention" in (host.config.layer_types or [])
        host.generation_config = embed.generation_config
        self.route = route
        return host

    # -- export ---------------------------------------------------------------

    def folded_state(self, route: Route) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
        """A standard model equal to ``route``: its config (a dict) and tensors.

        Scales fold as ``fold_factors`` says (see the module docstring);
        refuses architectures where that is not exact.
        """
        self.check(route)
        model_type = self._config.model_type
        if model_type not in FOLDABLE and any(s.scale != 1.0 for s in route.layers):
            raise EvomergeError(
                f"route scales cannot be folded exactly into a {model_type} model (only pre-norm RMSNorm "
                f"architectures: {', '.join(sorted(FOLDABLE))}); export a route without scales"
            )
        projections = FOLDABLE.get(model_type, ())
        embed_f, norm_f, step_f = fold_factors(route, self.tied)
        embed, head = (self.pool[n] for n in self.ends(route))

        def scaled(t: torch.Tensor, f: float) -> torch.Tensor:
            t = t.detach()
            return t.clone() if f == 1.0 else (t.double() * f).to(t.dtype)

        tensors = {"model.embed_tokens.weight": scaled(embed.model.embed_tokens.weight, embed_f)}
        tensors["model.norm.weight"] = scaled(head.model.norm.weight, norm_f)
        if not self.tied:
            tensors["lm_head.weight"] = scaled(head.lm_head.weight, 1.0)
        for k, (step, f) in enumerate(zip(route.layers, step_f)):
            layer = _layers(self.pool[step.model])[step.layer]
            for rest, t in layer.state_dict().items():
                folds = any(f"{p}." in rest for p in projections)
                tensors[f"model.layers.{k}.{rest}"] = scaled(t, f if folds else 1.0)
        config = self.config_for(route).to_dict()
        for key in ("_name_or_path", "transformers_version"):
            config.pop(key, None)
        return config, tensors


def fold_factors(route: Route, tied: bool) -> tuple[float, float, list[float]]:
    """Factors that fold a route's scales into plain weights: for the
    embeddings, the final norm, and each step's output projections.

    The first scale goes into the embeddings (exact: the first layer then
    sees exactly the routed input); with tied embeddings the final norm
    divides it back out of the head. Step k's projections get
    ``1 / (s_2 ... s_k)``.
    """
    first = route.layers[0].scale
    factors, f = [], 1.0
    for i, step in enumerate(route.layers):
        if i:
            f /= step.scale
        factors.append(f)
    return first, (1.0 / first if tied else 1.0), factors


@torch.no_grad()
def max_logit_difference(a: nn.Module, b: nn.Module, vocab_size: int, seed: int = 0, batches: int = 3) -> float:
    """Largest absolute logit difference between two models on random tokens."""
    g = torch.Generator().manual_seed(seed)
    worst = 0.0
    for length in (7, 16, 33)[:batches]:
        ids = torch.randint(0, vocab_size, (2, length), generator=g)
        device = next(a.parameters()).device
        la = a(input_ids=ids.to(device)).logits.float()
        lb = b(input_ids=ids.to(next(b.parameters()).device)).logits.float().to(la.device)
        worst = max(worst, float((la - lb).abs().max()))
    return worst


def _fold_tolerance(logits_scale: float) -> float:
    return FOLD_TOLERANCE * max(1.0, logits_scale)


# An exported routed model must give the routed model's logits within this
# (relative to the logits' size when they exceed 1).
FOLD_TOLERANCE = 1e-4


class RouteMerger:
    """Materialises data-flow recipes in memory: the recipe's merge (if it
    has a method) in place into a live model, which is the routing source
    ``merge``; then the route over it and the routed sources.

    ``template`` names every model any recipe given to ``apply`` may use:
    its ``sources`` (and ``base_model``) for the merge, and ``routed`` for
    the route (default: the template's sources).
    """

    def __init__(
        self,
        template,
        *,
        routed: list[str] | None = None,
        root=".",
        device: str | None = None,
        allow_outside: bool = False,
        max_depth: int | None = None,
        memory: str = "auto",
        memory_budget: float | int | None = None,
        also: list[Recipe] | None = None,
    ):
        self.root = Path(root)
        self.devices = parse_devices(device)
        self.merger = None
        self._merged: str | None = None  # fingerprint of the merge the live model holds
        pool: dict[str, nn.Module] = {}
        if template is not None and template.method is not None:
            merges = [r.merge_part() for r in also or [] if r.method is not None]
            self.merger = InPlaceMerger(
                template.merge_part(),
                root=self.root,
                device=self.devices,
                allow_outside=allow_outside,
                memory=memory,
                memory_budget=memory_budget,
                also=merges,
            )
            pool[MERGED] = self.merger.model
        if routed is None:
            extra = template.route.models or [] if template.route is not None else []
            routed = [s.model for s in [*template.sources, *extra]]
        refs = [r for r in routed if r != MERGED]
        refs = list(dict.fromkeys(refs))
        probe = Recipe(sources=[Source(model=r) for r in refs], route=None, method="linear") if refs else None
        self.sources = open_sources(probe, self.root, allow_outside) if probe else {}
        dtype = torch_dtype(template.dtype if template is not None else None)
        for ref in refs:
            pool[ref] = load_live(self.sources[ref].path, dtype, self.devices)
        self.router = Router(pool, max_depth=max_depth)

    @torch.no_grad()
    def apply(self, recipe) -> nn.Module:
        """The routed model of ``recipe`` (a host sharing the sources' layers)."""
        if recipe.route is None:
            raise EvomergeError("the recipe has no route; merge it with the parameter-space merger")
        if recipe.method is not None:
            if self.merger is None:
                raise EvomergeError("this recipe merges before routing, but the merger was built without a merge")
            merge = recipe.merge_part()
            if merge.fingerprint() != self._merged:  # a fixed merge is merged once
                self._merged = None
                self.merger.apply(merge)
                self._merged = merge.fingerprint()
        return self.router.assemble(recipe.route)

    def tokenizer_folder(self, recipe):
        """Where the routed model's tokenizer files are: the embedding model's
        folder (for ``merge``, its config source), or ``tokenizer_source``."""
        ref = recipe.tokenizer_source or self.router.ends(recipe.route)[0]
        if ref == MERGED:
            base = recipe.base_model or recipe.sources[0].model
            return self.merger.sources[base].path
        if ref in self.sources:
            return self.sources[ref].path
        return self.merger.sources[ref].path if self.merger and ref in self.merger.sources else None

    @torch.no_grad()
    def export(self, recipe, out_dir, *, overwrite: bool = False, progress: bool = True):
        """Write ``recipe``'s routed model as a plain Hugging Face folder.

        The exported model has the route's depth and the sources'
        architecture; scales are folded (see the module docstring). Its
        logits are compared with the routed model's on random tokens, and a
        model that differs by more than ``FOLD_TOLERANCE`` is not written.
        """
        out_dir = check_output_folder(out_dir, overwrite)
        host = self.apply(recipe)
        config, tensors = self.router.folded_state(recipe.route)
        dtype = next(host.parameters()).dtype
        model = build_model(config, dtype, self.devices)
        model.load_state_dict(tensors, strict=not self.router.tied)
        model.tie_weights()
        bad = next((n for n, p in model.named_parameters() if not bool(torch.isfinite(p).all())), None)
        if bad is not None:
            raise EvomergeError(
                f"the routed model's tensor {bad} has NaN or inf values (a source has them, or the merge's "
                "weights or the route's scales push values past the dtype's range); use smaller values"
            )
        vocab = int(config["vocab_size"])
        diff = max_logit_difference(host, model, vocab, seed=recipe.seed)
        scale = _logit_scale(host, vocab, recipe.seed)
        if diff > _fold_tolerance(scale):
            raise EvomergeError(
                f"the route's scales do not fold exactly into a plain model (logits differ by up to {diff:.2e}, "
                f"more than {FOLD_TOLERANCE:g}); the norms' epsilon matters at these scales. Keep the route "
                "in evomerge's format, or search scales in narrower bounds"
            )
        folder = self.tokenizer_folder(recipe)
        meta = dict(recipe.metadata, fold_max_logit_difference=diff)
        # Pin every source by sha256, as merge_to_disk does.
        opened = {**(self.merger.sources if self.merger is not None else {}), **self.sources}
        recipe = pinned(recipe, opened)
        return write_model_folder(
            out_dir,
            lambda tmp: model.save_pretrained(tmp, safe_serialization=True),  # config.json too
            recipe=recipe.model_copy(update={"metadata": meta}),
            card=route_card(recipe, config),
            tokenizer_from=folder,
        )


@torch.no_grad()
def _logit_scale(model: nn.Module, vocab_size: int, seed: int) -> float:
    g = torch.Generator().manual_seed(seed + 1)
    ids = torch.randint(0, vocab_size, (1, 16), generator=g).to(next(model.parameters()).device)
    return float(model(input_ids=ids).logits.float().abs().max())


def route_card(recipe, config: dict) -> str:
    """A model card stating the route and its sources."""
    lines = [
        "# Routed model",
        "",
        "Made with [evomerge](https://github.com/evomerge/evomerge): a data-flow (layer routing) recipe, "
        f"{len(recipe.route.layers)} layers of a {config.get('model_type')} architecture. Input scales are folded "
        "into the output projections; it loads with `AutoModelForCausalLM`, no remote code.",
        "",
        "| step | model | layer | scale |",
        "| --- | --- | --- | --- |",
    ]
    for i, s in enumerate(recipe.route.layers):
        lines.append(f"| {i} | {s.model} | {s.layer} | {s.scale:g} |")
    if recipe.method is not None:
        lines += ["", f"`merge` is the recipe's {recipe.method} merge of:", ""]
        lines += [f"- {s.model}" for s in recipe.sources]
    lines += ["", "Sources:", ""] + [f"- {s.model}" for s in recipe.sources]
    lines += ["", "The full recipe is in `recipe.yaml`.", ""]
    return "\n".join(lines)


def route_to_passthrough(recipe, tied: bool, projections=("o_proj", "down_proj")):
    """The route as a mergekit ``passthrough`` recipe (slices with folded
    scales on the output projections), or None when mergekit cannot express
    it: a step from the recipe's own merge, or embeddings or head from
    another model than the first and the last step's."""
    from evomerge.engine.recipe import Conditional, Recipe, Slice, SliceSource

    route = recipe.route
    if recipe.method is not None or any(s.model == MERGED for s in route.layers):
        return None
    first, last = route.layers[0].model, route.layers[-1].model
    if (route.embed or first) != first or (route.head or last) != last:
        return None
    embed_f, norm_f, step_f = fold_factors(route, tied)
    slices: list[Slice] = []
    run: list = []  # consecutive layers of one model with one folded factor

    def close(extra: list) -> None:
        model, start, f = run[0]
        conds = [Conditional(value=round(f, 12), filter=p) for p in projections] if f != 1.0 else []
        conds = extra + conds
        params = {"scale": conds + [Conditional(value=1.0)]} if conds else None
        slices.append(
            Slice(sources=[SliceSource(model=model, layer_range=(start, start + len(run)))], parameters=params)
        )
        run.clear()

    # Embeddings are written with the first slice, the final norm with the last.
    embed_cond = [Conditional(value=round(embed_f, 12), filter="embed_tokens")] if embed_f != 1.0 else []
    norm_cond = [Conditional(value=round(norm_f, 12), filter="model.norm.")] if norm_f != 1.0 else []
    for step, f in zip(route.layers, step_f):
        if run and (step.model != run[-1][0] or step.layer != run[-1][1] + 1 or f != run[-1][2]):
            close(embed_cond if not slices else [])
        run.append((step.model, step.layer, f))
    close((embed_cond if not slices else []) + norm_cond)
    return Recipe(
        method="passthrough",
        sources=[s.model_copy(update={"parameters": None}) for s in recipe.sources],
        slices=slices,
        dtype=recipe.dtype,
        seed=recipe.seed,
    )


def load_live(path, dtype: torch.dtype | None = None, device="cpu") -> nn.Module:
    """A source model folder as a live causal LM (safetensors only, no remote
    code) on ``device``, or split over a list of devices."""
    import transformers

    try:
        model = transformers.AutoModelForCausalLM.from_pretrained(
            str(path), dtype=dtype, use_safetensors=True, trust_remote_code=False
        )
    except (OSError, ValueError) as e:
        raise EvomergeError(
            f"cannot load {path} as a causal LM ({str(e).splitlines()[0][:120]}); check the folder"
        ) from None
    return place(model, parse_devices(device)).eval()


__all__ = [
    "FOLDABLE",
    "FOLD_TOLERANCE",
    "MERGED",
    "RouteMerger",
    "RoutedLayer",
    "Router",
    "check_same_width",
    "load_live",
    "max_logit_difference",
    "route_to_passthrough",
]
