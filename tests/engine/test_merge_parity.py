"""Parity with mergekit 0.1.5: the same config, merged by mergekit itself and by
evomerge, gives the same tensors (each within 1e-5 of the tensor's largest
magnitude), the same tensor names and shapes, and the same layer count.

Every deterministic method is covered on a Llama-style family (untied
embeddings, grouped-query attention) and a Qwen2-style one (attention biases,
tied embeddings), with per-layer gradients and name filters at every level a
mergekit config allows: per model, per slice and top level. Each case also
merges a perturbed config with evomerge and checks that it does *not* match,
so a comparison that could never fail cannot pass. The methods evomerge
computes operation for operation as mergekit does (``BIT_IDENTICAL``) must
match bit for bit, and give the same logits. Last, magnitude pruning is
checked where equal magnitudes straddle the density cut.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Callable
from importlib.metadata import version
from pathlib import Path

import pytest
import torch
import transformers
from helpers import read_tensors

from evomerge.engine.merge import merge_to_disk
from evomerge.engine.recipe import Recipe

RTOL = 1e-5  # relative to the largest magnitude of mergekit's tensor
ATOL = 1e-7  # for tensors that are (near) all zero, e.g. a scale-0 o_proj


# -- running both sides ----------------------------------------------------------


def test_the_reference_is_mergekit_0_1_5():
    # mergekit is a pinned dev dependency; a missing or different one must
    # fail loudly rather than skip the parity checks.
    assert version("mergekit") == "0.1.5"


def _run_mergekit(cfg: dict, out: Path) -> int:
    """Merge ``cfg`` with mergekit itself into ``out``; return the output's layer count."""
    from mergekit.config import MergeConfiguration
    from mergekit.merge import run_merge
    from mergekit.options import MergeOptions

    options = MergeOptions(quiet=True, write_model_card=False)
    try:
        run_merge(MergeConfiguration.model_validate(copy.deepcopy(cfg)), str(out), options=options)
    except Exception as e:
        # mergekit 0.1.5 sets num_hidden_layers on the output config but leaves
        # per-layer lists (Qwen2's layer_types) at the source depth, which
        # transformers 5 refuses to save when the depth changed. That happens
        # after every tensor is written, so the tensors are still mergekit's,
        # and the depth it set is the number of layers it wrote.
        if "layer_types" not in str(e) or (out / "config.json").exists():
            raise
        return len(_layer_indices(read_tensors(out)))
    return _num_layers(out)


def _run_evomerge(cfg: dict, out: Path) -> Path:
    return merge_to_disk(Recipe.from_dict(copy.deepcopy(cfg)), out, allow_outside=True, progress=False)


def _mismatches(ours: dict, theirs: dict) -> list[str]:
    """Why ``ours`` differs from mergekit's ``theirs``; empty when they agree."""
    if ours.keys() != theirs.keys():
        return [
            f"tensor names differ: only ours {sorted(ours.keys() - theirs.keys())}, "
            f"only mergekit {sorted(theirs.keys() - ours.keys())}"
        ]
    problems = []
    for name, b in theirs.items():
        a = ours[name]
        if a.shape != b.shape:
            problems.append(f"{name}: shape {tuple(a.shape)} vs mergekit {tuple(b.shape)}")
            continue
        if a.dtype != b.dtype:
            problems.append(f"{name}: dtype {a.dtype} vs mergekit {b.dtype}")
            continue
        err = float((a.double() - b.double()).abs().max())
        scale = float(b.double().abs().max())
        if err > RTOL * scale + ATOL:
            problems.append(f"{name}: max |diff| {err:.3g} > {RTOL:g} * {scale:.3g}")
    return problems


def _num_layers(folder: Path) -> int:
    return json.loads((folder / "config.json").read_text())["num_hidden_layers"]


def _layer_indices(tensors: dict) -> set[int]:
    return {int(k.split(".layers.")[1].split(".")[0]) for k in tensors if ".layers." in k}


def _check_parity(case: Callable, family, tmp_path: Path) -> None:
    cfg = case(family, 0.0)
    their_layers = _run_mergekit(cfg, tmp_path / "mergekit")
    ours_dir = _run_evomerge(cfg, tmp_path / "evomerge")
    theirs, ours = read_tensors(tmp_path / "mergekit"), read_tensors(ours_dir)

    problems = _mismatches(ours, theirs)
    assert not problems, "evomerge differs from mergekit:\n" + "\n".join(problems[:20])
    if case.__name__.removesuffix("_bf16") in BIT_IDENTICAL:
        differ = [k for k in theirs if not torch.equal(ours[k], theirs[k])]
        assert not differ, f"not bit-identical to mergekit: {differ[:5]}"
        _assert_same_logits(ours_dir, tmp_path / "mergekit")
    assert _num_layers(ours_dir) == their_layers
    assert _layer_indices(theirs) == set(range(their_layers))
    transformers.AutoConfig.from_pretrained(ours_dir)  # per-layer lists follow the depth

    # Not vacuous: the merge is no plain copy of an input, and a slightly
    # different config gives tensors the comparison rejects.
    for src in set(_model_paths(cfg)):
        inp = read_tensors(Path(src))
        same = [k for k in theirs if k in inp and theirs[k].shape == inp[k].shape and torch.equal(theirs[k], inp[k])]
        assert len(same) < len(theirs), f"the merge is a plain copy of {src}"
    perturbed = read_tensors(_run_evomerge(case(family, 0.1), tmp_path / "perturbed"))
    assert _mismatches(perturbed, theirs), "a perturbed config still matched mergekit: the check is vacuous"


def _assert_same_logits(ours: Path, theirs: Path) -> None:
    """Both merged models, loaded by transformers, give the same logits."""
    ids = torch.randint(4, 200, (2, 12), generator=torch.Generator().manual_seed(0))
    logits = []
    for folder in (ours, theirs):
        model = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
        with torch.no_grad():
            logits.append(model(ids).logits)
    assert torch.isfinite(logits[0]).all()
    assert torch.equal(logits[0], logits[1])


def _model_paths(cfg: dict) -> list[str]:
    refs = [m["model"] for m in cfg.get("models") or []]
    refs += [s["model"] for sl in cfg.get("slices") or [] for s in sl["sources"]]
    return refs + ([cfg["base_model"]] if cfg.get("base_model") else [])


# -- the configs ---------------------------------------------------------------
# Each case builds a mergekit config for a family; ``k`` (0 for the real
# config, 0.1 for the perturbed one) nudges a parameter the merge depends on.


def _paths(f):
    return str(f.base), [str(p) for p in f.ft]


def linear(f, k):
    _, ft = _paths(f)
    return {
        "merge_method": "linear",
        "dtype": "float32",
        "models": [
            {"model": ft[0], "parameters": {"weight": [0.2 + k, 0.8, 0.5]}},
            {"model": ft[1], "parameters": {"weight": [{"filter": "self_attn", "value": 0.9}, {"value": 0.3}]}},
            {"model": ft[2], "parameters": {"weight": 0.4}},
        ],
    }


def linear_unnormalized(f, k):
    base, ft = _paths(f)
    return {
        "merge_method": "linear",
        "dtype": "float32",
        "parameters": {"normalize": False},
        "models": [
            {"model": base, "parameters": {"weight": 0.5}},
            {"model": ft[0], "parameters": {"weight": [0.1, 0.4 + k]}},
            {"model": ft[2], "parameters": {"weight": [{"filter": "mlp", "value": [0.6, 0.2]}, {"value": 0.1}]}},
        ],
    }


def task_arithmetic(f, k):
    base, ft = _paths(f)
    return {
        "merge_method": "task_arithmetic",
        "base_model": base,
        "dtype": "float32",
        "parameters": {"lambda": [{"filter": "mlp", "value": 1.3}, {"value": 0.8}]},
        "models": [
            {"model": ft[0], "parameters": {"weight": [1.0, 0.2 + k]}},
            {"model": ft[1], "parameters": {"weight": [{"filter": "self_attn", "value": -0.4}, {"value": 0.6}]}},
            {"model": ft[2], "parameters": {"weight": 0.5}},
        ],
    }


def ties(f, k):
    base, ft = _paths(f)
    return {
        "merge_method": "ties",
        "base_model": base,
        "dtype": "float32",
        "models": [
            {"model": ft[0], "parameters": {"weight": [1.0, 0.2], "density": 0.4 + k}},
            {"model": ft[1], "parameters": {"weight": 0.6, "density": [0.9, 0.3]}},
            {
                "model": ft[2],
                "parameters": {
                    "weight": [{"filter": "mlp", "value": 0.3}, {"value": 0.8}],
                    "density": [{"filter": "self_attn", "value": [0.2, 0.7, 0.5]}, {"value": 0.6}],
                },
            },
        ],
    }


def ties_unnormalized(f, k):
    base, ft = _paths(f)
    cfg = ties(f, 0.0)
    cfg["parameters"] = {"normalize": False, "rescale": True, "int8_mask": True, "lambda": 0.9 + k}
    cfg["models"] = cfg["models"][:2] + [{"model": base}]  # the base listed among the models
    return cfg


def breadcrumbs(f, k):
    base, ft = _paths(f)
    return {
        "merge_method": "breadcrumbs",
        "base_model": base,
        "dtype": "float32",
        "models": [
            {"model": ft[0], "parameters": {"weight": 0.7, "density": [0.8, 0.5], "gamma": 0.05 + k}},
            {"model": ft[1], "parameters": {"weight": [0.3, 0.9], "density": 0.6}},
        ],
    }


def breadcrumbs_ties(f, k):
    base, ft = _paths(f)
    return {
        "merge_method": "breadcrumbs_ties",
        "base_model": base,
        "dtype": "float32",
        "parameters": {"gamma": [{"filter": "mlp", "value": 0.1}, {"value": 0.02}], "rescale": True},
        "models": [
            {"model": ft[0], "parameters": {"weight": 0.7, "density": [0.8, 0.5 + k]}},
            {"model": ft[1], "parameters": {"weight": 0.5, "density": 0.6}},
            {"model": ft[2], "parameters": {"weight": [0.9, 0.4], "density": 0.7, "gamma": 0.0}},
        ],
    }


def slerp(f, k):
    base, ft = _paths(f)
    return {
        "merge_method": "slerp",
        "base_model": base,
        "dtype": "float32",
        "models": [{"model": base}, {"model": ft[0]}],
        "parameters": {
            "t": [
                {"filter": "self_attn", "value": [0.0, 0.5 + k, 0.3, 1.0]},
                {"filter": "mlp", "value": [1.0, 0.5, 0.7]},
                {"value": 0.4},
            ]
        },
    }


def nuslerp_base(f, k):
    base, ft = _paths(f)
    return {
        "merge_method": "nuslerp",
        "base_model": base,
        "dtype": "float32",
        "models": [
            {"model": ft[0], "parameters": {"weight": [0.3 + k, 0.9]}},
            {"model": ft[1], "parameters": {"weight": 0.7}},
        ],
    }


def nuslerp_no_base(f, k):
    _, ft = _paths(f)
    return {
        "merge_method": "nuslerp",
        "dtype": "float32",
        "parameters": {"nuslerp_flatten": False},
        "models": [
            {"model": ft[0], "parameters": {"weight": [{"filter": "mlp", "value": 0.2 + k}, {"value": 0.6}]}},
            {"model": ft[2], "parameters": {"weight": 0.5}},
        ],
    }


def nuslerp_row_wise(f, k):
    base, ft = _paths(f)
    return {
        "merge_method": "nuslerp",
        "base_model": base,
        "dtype": "float32",
        "parameters": {"nuslerp_flatten": False, "nuslerp_row_wise": True},
        "models": [
            {"model": ft[1], "parameters": {"weight": 0.4}},
            {"model": ft[2], "parameters": {"weight": [0.5, 0.9 + k]}},
        ],
    }


def model_stock(f, k):
    base, ft = _paths(f)
    return {
        "merge_method": "model_stock",
        "base_model": base,
        "dtype": "float32",
        # The perturbed config leaves one fine-tune out.
        "models": [{"model": p} for p in (ft if k == 0 else ft[:2])],
    }


def model_stock_filter_wise(f, k):
    cfg = model_stock(f, 0.0)
    cfg["parameters"] = {"filter_wise": [{"filter": "mlp", "value": k == 0}, {"value": False}]}
    return cfg


def passthrough(f, k):
    """Interleave layers of two models at the source depth, repeating ft0's
    layer 1, with o_proj scaled to 0 in one slice and scale gradients. The
    top-level gradient reaches every slice; a one-layer slice sits at t = 1,
    so it takes the gradient's last value."""
    _, ft = _paths(f)
    return {
        "merge_method": "passthrough",
        "dtype": "float32",
        "parameters": {"scale": [{"filter": "mlp.up_proj", "value": [0.2, 0.7]}]},
        "slices": [
            {
                "sources": [{"model": ft[0], "layer_range": [0, 2]}],
                "parameters": {"scale": [{"filter": "mlp.down_proj", "value": [0.5, 1.5]}, {"value": 1.0}]},
            },
            {
                "sources": [
                    {
                        "model": ft[1],
                        "layer_range": [2, 3],
                        "parameters": {"scale": [{"filter": "o_proj", "value": 0.0}, {"value": 1.0 + k}]},
                    }
                ]
            },
            {"sources": [{"model": ft[0], "layer_range": [1, 2]}]},
        ],
    }


def passthrough_deeper(f, k):
    """Stack 8 layers from a 4-layer source: layer ranges of two models,
    repeating layers 2 and 3, with filters and a gradient on ``scale``."""
    _, ft = _paths(f)
    return {
        "merge_method": "passthrough",
        "dtype": "float32",
        "slices": [
            {"sources": [{"model": ft[0], "layer_range": [0, 3]}]},
            {
                "sources": [
                    {
                        "model": ft[1],
                        "layer_range": [1, 4],
                        "parameters": {"scale": [{"filter": "o_proj", "value": 0.0}, {"value": 1.0 + k}]},
                    }
                ]
            },
            {
                "sources": [{"model": ft[0], "layer_range": [2, 4]}],
                "parameters": {"scale": [{"filter": "mlp.down_proj", "value": [0.5, 1.5]}, {"value": 1.0}]},
            },
        ],
    }


def slerp_slices(f, k):
    """slerp over two slices (different partners, per-slice t gradients)."""
    base, ft = _paths(f)
    return {
        "merge_method": "slerp",
        "base_model": base,
        "dtype": "float32",
        "parameters": {"t": [{"filter": "self_attn", "value": [0.2, 0.8]}, {"value": 0.5}]},
        "slices": [
            {
                "sources": [{"model": base, "layer_range": [0, 2]}, {"model": ft[0], "layer_range": [0, 2]}],
                "parameters": {"t": [{"filter": "mlp", "value": [0.9, 0.1 + k]}]},
            },
            {"sources": [{"model": ft[1], "layer_range": [2, 4]}, {"model": base, "layer_range": [2, 4]}]},
        ],
    }


def ties_slices(f, k):
    """A generalized-task-arithmetic merge over slices, with a slice-level
    base model, slice parameters and per-model parameters in each slice."""
    base, ft = _paths(f)
    return {
        "merge_method": "ties",
        "base_model": base,
        "dtype": "float32",
        "parameters": {"weight": 0.5, "density": [{"filter": "mlp", "value": [0.3, 0.9]}, {"value": 0.6}]},
        "slices": [
            {
                "sources": [
                    {"model": base, "layer_range": [0, 2]},
                    {"model": ft[0], "layer_range": [0, 2], "parameters": {"weight": [1.0, 0.4 + k]}},
                    {"model": ft[1], "layer_range": [0, 2]},
                ],
            },
            {
                "base_model": ft[2],
                "sources": [
                    {"model": ft[2], "layer_range": [1, 3]},
                    {"model": ft[0], "layer_range": [2, 4]},
                    {"model": ft[1], "layer_range": [2, 4], "parameters": {"density": 0.5}},
                ],
                "parameters": {"lambda": 1.2},
            },
        ],
    }


def top_level(f, k):
    """Every parameter at top level, by filter (self_attn, mlp) and gradient."""
    base, ft = _paths(f)
    return {
        "merge_method": "task_arithmetic",
        "base_model": base,
        "dtype": "float32",
        "parameters": {
            "weight": [
                {"filter": "self_attn", "value": [0.2, 0.9 + k]},
                {"filter": "mlp", "value": [0.8, 0.1, 0.5]},
                {"value": 0.5},
            ],
            "lambda": [{"filter": "self_attn", "value": 1.2}, {"value": [0.9, 1.1]}],
        },
        # A per-model setting outranks the top level; where its filter misses
        # (everything but input_layernorm), the top level applies.
        "models": [
            {"model": ft[0]},
            {"model": ft[1], "parameters": {"weight": [{"filter": "input_layernorm", "value": 0.3}]}},
        ],
    }


def multislerp_base(f, k):
    """Three task vectors, weights by gradient and filter (normalized)."""
    base, ft = _paths(f)
    return {
        "merge_method": "multislerp",
        "base_model": base,
        "dtype": "float32",
        "models": [
            {"model": ft[0], "parameters": {"weight": [0.2 + k, 0.9]}},
            {"model": ft[1], "parameters": {"weight": [{"filter": "self_attn", "value": 0.7}, {"value": 0.3}]}},
            {"model": ft[2], "parameters": {"weight": 0.5}},
        ],
    }


def multislerp_no_base(f, k):
    """Two whole models, unnormalized weights, another eps."""
    _, ft = _paths(f)
    return {
        "merge_method": "multislerp",
        "dtype": "float32",
        "parameters": {"normalize_weights": False, "eps": [{"filter": "mlp", "value": 1e-6}, {"value": 1e-8}]},
        "models": [
            {"model": ft[0], "parameters": {"weight": [{"filter": "mlp", "value": [0.3, 0.5 + k]}, {"value": 0.4}]}},
            {"model": ft[1], "parameters": {"weight": 0.6}},
        ],
    }


def nearswap(f, k):
    """t by gradient and filter, around the size of the task vectors' entries."""
    base, ft = _paths(f)
    return {
        "merge_method": "nearswap",
        "base_model": base,
        "dtype": "float32",
        "models": [{"model": base}, {"model": ft[1]}],
        "parameters": {"t": [{"filter": "mlp", "value": [0.0002, 0.001 + k / 100]}, {"value": 0.0005}]},
    }


def karcher(f, k):
    """The base is an ordinary input (karcher ignores base_model's role);
    tol by filter. The perturbed config leaves a model out."""
    base, ft = _paths(f)
    return {
        "merge_method": "karcher",
        "base_model": base,
        "dtype": "float32",
        "parameters": {"max_iter": 20, "tol": [{"filter": "mlp", "value": 1e-6}, {"value": 1e-5}]},
        "models": [{"model": p} for p in (ft if k == 0 else ft[:2])],
    }


def sce(f, k):
    """select_topk by gradient and filter."""
    base, ft = _paths(f)
    return {
        "merge_method": "sce",
        "base_model": base,
        "dtype": "float32",
        "parameters": {"select_topk": [{"filter": "self_attn", "value": [0.3, 0.8 + k]}, {"value": 0.5}]},
        "models": [{"model": p} for p in ft],
    }


def sce_no_selection(f, k):
    """Every entry selected (the default), int8 masks; the perturbed config leaves a model out."""
    base, ft = _paths(f)
    return {
        "merge_method": "sce",
        "base_model": base,
        "dtype": "float32",
        "parameters": {"int8_mask": True},
        "models": [{"model": p} for p in (ft if k == 0 else ft[:2])],
    }


def arcee_fusion(f, k):
    """No parameters; the perturbed config fuses another model."""
    base, ft = _paths(f)
    return {
        "merge_method": "arcee_fusion",
        "base_model": base,
        "dtype": "float32",
        "models": [{"model": base}, {"model": ft[0] if k == 0 else ft[2]}],
    }


def ram(f, k):
    """epsilon by gradient and filter, around the size of the task vectors' entries."""
    base, ft = _paths(f)
    return {
        "merge_method": "ram",
        "base_model": base,
        "dtype": "float32",
        "parameters": {"epsilon": [{"filter": "mlp", "value": [1e-4, 5e-4 + k / 100]}, {"value": 3e-4}]},
        "models": [{"model": p} for p in ft],
    }


def ramplus_tl(f, k):
    """r by gradient, alpha by filter, epsilon shared."""
    base, ft = _paths(f)
    return {
        "merge_method": "ramplus_tl",
        "base_model": base,
        "dtype": "float32",
        "parameters": {
            "r": [0.5, 0.1 + k],
            "alpha": [{"filter": "self_attn", "value": 1.5}, {"value": 0.2}],
            "epsilon": 4e-4,
        },
        "models": [{"model": p} for p in ft],
    }


# Cases whose every tensor (and so every logit) is mergekit's, bit for bit,
# in float32 and bfloat16: the methods whose arithmetic evomerge repeats
# operation for operation.
BIT_IDENTICAL = {
    "multislerp_base",
    "multislerp_no_base",
    "nearswap",
    "karcher",
    "sce",
    "sce_no_selection",
    "arcee_fusion",
    "ram",
    "ramplus_tl",
}


CASES = [
    linear,
    linear_unnormalized,
    task_arithmetic,
    ties,
    ties_unnormalized,
    breadcrumbs,
    breadcrumbs_ties,
    slerp,
    nuslerp_base,
    nuslerp_no_base,
    nuslerp_row_wise,
    model_stock,
    model_stock_filter_wise,
    passthrough,
    passthrough_deeper,
    slerp_slices,
    ties_slices,
    top_level,
    multislerp_base,
    multislerp_no_base,
    nearswap,
    karcher,
    sce,
    sce_no_selection,
    arcee_fusion,
    ram,
    ramplus_tl,
]


def _bf16(case: Callable) -> Callable:
    """The case computed in bfloat16, where equal magnitudes are everywhere
    and the order of every rounding step shows in the result."""

    def bf16_case(f, k):
        return {**case(f, k), "dtype": "bfloat16"}

    bf16_case.__name__ = f"{case.__name__}_bf16"
    return bf16_case


BF16_CASES = [
    _bf16(c)
    for c in (
        task_arithmetic,
        ties,
        breadcrumbs,
        breadcrumbs_ties,
        slerp_slices,
        nuslerp_base,
        multislerp_base,
        nearswap,
        karcher,
        sce,
        ram,
    )
]


@pytest.mark.parametrize("case", CASES + BF16_CASES, ids=lambda c: c.__name__)
def test_matches_mergekit(case, family, tmp_path):
    _check_parity(case, family, tmp_path)


@pytest.mark.parametrize("case", [ties, breadcrumbs_ties, _bf16(ties), _bf16(breadcrumbs)], ids=lambda c: c.__name__)
def test_in_place_merge_matches_mergekit(case, family, tmp_path):
    """The search's in-place path (resident task vectors and magnitude ranks,
    reused across candidates) gives mergekit's tensors too."""
    from evomerge.engine.merge import InPlaceMerger

    merger = InPlaceMerger(Recipe.from_dict(case(family, 0.1)), allow_outside=True)
    merger.apply(Recipe.from_dict(case(family, 0.1)))  # fill the resident caches with another candidate
    _run_mergekit(case(family, 0.0), tmp_path / "mergekit")
    theirs = read_tensors(tmp_path / "mergekit")
    live = merger.apply(Recipe.from_dict(case(family, 0.0))).state_dict()
    assert theirs.keys() <= live.keys()
    problems = _mismatches({k: live[k] for k in theirs}, theirs)
    assert not problems, "the in-place merge differs from mergekit:\n" + "\n".join(problems[:20])
    perturbed = merger.apply(Recipe.from_dict(case(family, 0.1))).state_dict()
    assert _mismatches({k: perturbed[k] for k in theirs}, theirs)


@pytest.mark.parametrize("case", [arcee_fusion, ramplus_tl], ids=lambda c: c.__name__)
def test_bf16_merges_mergekit_leaves_in_float32(case, family, tmp_path):
    """In bfloat16, arcee_fusion's mask and ramplus_tl's boost are float32,
    so mergekit 0.1.5 computes these merges in float32 and writes them so,
    ignoring the config's dtype. evomerge writes the dtype asked for: each
    tensor is mergekit's, rounded once to bfloat16."""
    cfg = {**case(family, 0.0), "dtype": "bfloat16"}
    _run_mergekit(cfg, tmp_path / "mergekit")
    theirs = read_tensors(tmp_path / "mergekit")
    ours = read_tensors(_run_evomerge(cfg, tmp_path / "evomerge"))
    assert ours.keys() == theirs.keys()
    assert {t.dtype for t in theirs.values()} == {torch.float32}
    for k, t in theirs.items():
        assert ours[k].dtype == torch.bfloat16, k
        assert torch.equal(ours[k], t.to(torch.bfloat16)), k
    # Not vacuous: the float32 values are not all representable in bfloat16.
    assert any(not torch.equal(t.to(torch.bfloat16).float(), t) for t in theirs.values())


# -- ties in magnitude ------------------------------------------------------------


@pytest.mark.parametrize("method", ["ties", "breadcrumbs"])
@pytest.mark.parametrize("resident", [False, True], ids=["one-shot", "resident"])
@pytest.mark.parametrize("shape", [(128, 64), (4099,)], ids=["2d", "1d"])
def test_equal_magnitudes_at_the_cut_keep_what_mergekit_keeps(method, resident, shape):
    """Which of several equal magnitudes straddling the density cut survive is
    decided by mergekit's own (unstable) sort, not by any other order.

    Real checkpoints have such ties (bf16 weights all the time; the tiny
    float32 Qwen2 here has one in a breadcrumbs merge). A task vector with
    only 41 distinct magnitudes makes one at every cut.
    """
    from mergekit.sparsify import magnitude, magnitude_outliers

    from evomerge.engine.methods import TensorInputs, get_method

    g = torch.Generator().manual_seed(0)
    base = torch.randn(shape, generator=g)
    delta = torch.randint(-20, 21, shape, generator=g).float() * 1e-3
    ft = base + delta
    m = get_method(method)
    cases = 0
    for density in (0.3, 0.55, 0.9):
        x = TensorInputs("w", [base, ft], 0, seed=0, cache={}, resident=resident)
        p = {q.name: q.default for q in m.params}
        p.update(weight=[1.0], density=[density], normalize=False, rescale=False)
        if method == "breadcrumbs":
            p["gamma"] = [0.05]
        ours = m.fn(x, p) - base
        d = ft - base
        theirs = magnitude(d, density) if method == "ties" else magnitude_outliers(d, density, gamma=0.05)
        assert torch.equal(ours != 0, theirs != 0), f"density {density}: a different set of entries was kept"
        assert torch.allclose(ours, theirs, rtol=0, atol=1e-6)
        # Not vacuous: a stable sort would have kept other entries.
        w = d.abs().reshape(-1)
        n, keep = w.numel(), int(density * w.numel())
        lo = n - keep if method == "ties" else max(0, n - keep - int(0.05 * n))
        stable = torch.zeros(n, dtype=torch.bool)
        stable[torch.argsort(w, stable=True)[lo : lo + keep]] = True
        cases += not torch.equal(stable, (theirs != 0).reshape(-1))
    assert cases, "no density cut fell inside a run of equal magnitudes"
