"""SCE (arXiv 2408.07990): select the entries where the task vectors vary
most, calculate each model's weight from its task vector's energy, erase the
entries whose sign disagrees with the majority, and merge. Semantics follow
mergekit 0.1.5's sce."""

from __future__ import annotations

import torch

from evomerge.methods.base import TensorInputs


def _select(deltas: torch.Tensor, fraction: float) -> torch.Tensor:
    """1 on the ``fraction`` of entries (counted among those that vary at all)
    whose variance across the models is largest, 0 elsewhere."""
    if fraction <= 0:
        return torch.zeros_like(deltas[0])
    spread = torch.var(deltas, dim=0, unbiased=False)
    # The count times the fraction is taken in float32 (a tensor product),
    # truncated: the same k as mergekit's, even where the product is near a
    # whole number.
    k = int(torch.count_nonzero(spread) * fraction)
    keep = torch.zeros_like(spread)
    if k > 0:
        # torch.topk, as mergekit calls it: it decides which equal variances at the cut survive.
        keep.view(-1)[torch.topk(spread.abs().view(-1), k=k, largest=True).indices] = 1
    return keep


def _energy_weights(deltas: torch.Tensor) -> torch.Tensor:
    """Each model's mean squared task vector, as a share of their sum
    (equal shares when the sum is about 0)."""
    energy = deltas.square().reshape(deltas.shape[0], -1).mean(dim=1)
    total = torch.sum(energy).item()
    if abs(total) < 1e-6:
        return torch.ones_like(energy) / energy.shape[0]
    return energy / total


def sce(x: TensorInputs, p: dict) -> torch.Tensor:
    models = x.non_base
    if not models:
        return x.base
    deltas = torch.stack([x.delta(i) for i in models])
    if p["select_topk"] < 1:
        deltas = deltas * _select(deltas, p["select_topk"]).unsqueeze(0)
    # Erase: keep an entry of a task vector only where its sign is the sign
    # of the entries' sum over the models (a zero sum counts as positive).
    majority = torch.where(deltas.sum(dim=0) >= 0, 1, -1).to(deltas.dtype)
    agree = deltas.sign() == majority
    weights = _energy_weights(deltas).view(-1, *([1] * (deltas.dim() - 1)))
    kept = weights * agree
    merged = (deltas * kept).sum(dim=0) / kept.sum(dim=0).clamp(min=1e-6)
    return x.base + merged
