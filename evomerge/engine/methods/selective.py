"""Entry-wise selective merges of a base and other models: nearswap,
arcee_fusion, and RAM / RAM+ (reinforced agent merging)."""

from __future__ import annotations

import dataclasses
import math

import torch

from evomerge.engine.methods.base import MergeMethod, Param, TensorInputs
from evomerge.engine.methods.params import RAM_EPSILON


def nearswap(x: TensorInputs, p: dict) -> torch.Tensor:
    """Move each entry of the base toward the other model by at most ``t``:
    entries within ``t`` of each other take the other model's value, farther
    ones the fraction t / |difference| of the way (mergekit's nearswap)."""
    other = x.non_base[0]
    gap = x.delta(other).abs()  # |base - other| exactly: a rounded difference only changes sign
    share = (p["t"] / gap.clamp(min=1e-6)).clamp(min=0, max=1)
    return share * x.tensors[other] + (1 - share) * x.base


# Tensors larger than this have their importance quantiles estimated from a
# sample of this many entries (drawn with replacement), as mergekit does.
_QUANTILE_SAMPLE = 1_000_000


def _importance(x: TensorInputs, other: int) -> torch.Tensor:
    """|task vector| times the KL divergence, along the last axis, of the
    softmax of the other model's row from the softmax of the base's row."""
    smooth = 1e-8
    mine = torch.softmax(x.tensors[other], dim=-1) + smooth
    ref = torch.softmax(x.base, dim=-1) + smooth
    divergence = torch.sum(mine * torch.log(mine / ref), dim=-1, keepdim=True)
    return x.delta(other).abs() * divergence


def arcee_fusion(x: TensorInputs, p: dict) -> torch.Tensor:
    """Take the other model's entries where its importance reaches the
    outlier fence median + 1.5 * IQR of the tensor's importances, the
    base's elsewhere (mergekit's arcee_fusion). The quartiles are the order
    statistics at floor(q * (n - 1)); above 1M entries they come from a
    sample of 1M entries, seeded per tensor (mergekit draws it unseeded)."""
    other = x.non_base[0]
    importance = _importance(x, other)
    values = importance.reshape(-1)
    if values.numel() > _QUANTILE_SAMPLE:
        pick = torch.randint(values.numel(), (_QUANTILE_SAMPLE,), generator=x.generator(other), device=values.device)
        values = values[pick]
    at = (torch.tensor([0.25, 0.5, 0.75]).to(values.device) * (values.numel() - 1)).long()
    q1, median, q3 = (torch.kthvalue(values, int(i) + 1).values for i in at)
    keep = (importance >= median + 1.5 * (q3 - q1)).float()
    return x.base + x.delta(other) * keep


def _ram_masks(x: TensorInputs, epsilon: float):
    """The stacked flat task vectors, zeroed where |entry| <= epsilon; which
    entries are nonzero; and per entry, how many models move it."""
    flat = torch.stack([x.delta(i) for i in x.non_base]).reshape(len(x.non_base), -1)
    moved = flat.abs() > epsilon
    count = moved.sum(dim=0, keepdim=True)
    return flat * moved, moved, count


def ram(x: TensorInputs, p: dict) -> torch.Tensor:
    """RAM (arXiv 2601.13572): an entry only one model moves takes that
    model's change whole; one several models move takes their mean change.
    Changes of at most ``epsilon`` count as none."""
    if not x.non_base:
        return x.base
    deltas, _, count = _ram_masks(x, p["epsilon"])
    merged = (deltas * (count == 1) + deltas * (count > 1) / count.clamp(min=1)).sum(dim=0, keepdim=True)
    return x.base + merged.reshape_as(x.base)


def ramplus_tl(x: TensorInputs, p: dict) -> torch.Tensor:
    """RAM+ restricted to each tensor: as RAM, but each model's unique
    changes are scaled by 1 + r * min(max(rho, 0), alpha), rho being the
    ratio of its shared to its unique changed entries in this tensor."""
    if not x.non_base:
        return x.base
    epsilon = p["epsilon"]
    deltas, moved, count = _ram_masks(x, epsilon)
    shared, unique = count > 1, count == 1
    rho = (moved & shared).sum(dim=1) / (moved & unique).sum(dim=1).clamp(min=epsilon)
    boost = 1 + p["r"] * rho.clamp(min=0, max=p["alpha"])
    merged = (deltas * unique * boost.unsqueeze(-1) + deltas * shared / count.clamp(min=1)).sum(dim=0, keepdim=True)
    return x.base + merged.reshape_as(x.base)


# -- the declarations ---------------------------------------------------------

NEARSWAP = MergeMethod(
    "nearswap",
    nearswap,
    (
        Param(
            "t",
            float,
            limits=(0.0, math.inf),
            bounds=(0.0, 0.01),
            doc="how far each entry moves from the base toward the other model, at most",
        ),
    ),
    base="required",
    min_inputs=2,
    max_inputs=2,
    base_is_endpoint=True,
    reference="https://huggingface.co/alchemonaut/QuartetAnemoi-70B-t0.0001",
)
ARCEE_FUSION = MergeMethod(
    "arcee_fusion",
    arcee_fusion,
    (),
    base="required",
    min_inputs=2,
    max_inputs=2,
    reference="https://arcee.ai",
)
RAM = MergeMethod(
    "ram",
    ram,
    (RAM_EPSILON,),
    base="required",
    reference="https://arxiv.org/abs/2601.13572",
)
RAMPLUS_TL = MergeMethod(
    "ramplus_tl",
    ramplus_tl,
    (
        Param("r", float, default=0.1, limits=(0.0, math.inf), bounds=(0.0, 1.0), doc="boost of unique changes"),
        Param("alpha", float, default=0.2, limits=(0.0, math.inf), bounds=(0.0, 1.0), doc="cap on rho"),
        dataclasses.replace(RAM_EPSILON, open_low=True),
    ),
    base="required",
    reference="https://arxiv.org/abs/2601.13572",
)
METHODS = (
    NEARSWAP,
    ARCEE_FUSION,
    RAM,
    RAMPLUS_TL,
)
