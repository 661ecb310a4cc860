"""SCE (arXiv 2408.07990): select the entries where the task vectors vary
most, calculate each model's weight from its task vector's energy, erase the
entries whose sign disagrees with the majority, and merge. Semantics follow
mergekit 0.1.5's sce."""

from __future__ import annotations

import torch

from evomerge.engine.methods.base import MergeMethod, Param, TensorInputs
from evomerge.engine.methods.params import INT8_MASK
from evomerge.engine.methods.task_arithmetic import sum_over_models


def _select(x: TensorInputs, deltas: list[torch.Tensor], fraction: float) -> torch.Tensor:
    """1 on the ``fraction`` of entries (counted among those that vary at all)
    whose variance across the models is largest, 0 elsewhere."""
    if fraction <= 0:
        return torch.zeros_like(deltas[0])
    if x.resident:
        # The variance depends on the sources only: the in-place merger keeps
        # it, its nonzero count and its values in ascending order, so that a
        # candidate pays for a comparison, not for torch.var and a top-k.
        spread, nonzero, ascending = x.cached("sce_spread", lambda: _spread(torch.stack(deltas)))
    else:
        spread, nonzero, ascending = _spread(torch.stack(deltas), ordered=False)
    # The count times the fraction is taken in float32 (a tensor product),
    # truncated: the same k as mergekit's, even where the product is near a
    # whole number.
    k = int(nonzero * fraction)
    if k <= 0:
        return torch.zeros_like(spread)
    if ascending is not None:
        # The k largest are the entries at or above the k-th largest value,
        # unless more entries equal it than the cut can take.
        cut = ascending[ascending.numel() - k]
        if ascending.numel() - int(torch.searchsorted(ascending, cut)) == k:
            return (spread >= cut).to(spread.dtype)
    keep = torch.zeros_like(spread)
    # torch.topk, as mergekit calls it: it decides which equal variances at the cut survive.
    keep.view(-1)[torch.topk(spread.view(-1), k=k, largest=True).indices] = 1
    return keep


def _spread(deltas: torch.Tensor, ordered: bool = True) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """The variance across the models (as mergekit computes it, for the same
    bits), its nonzero count, and (``ordered``) its values in ascending order."""
    spread = torch.var(deltas, dim=0, unbiased=False).abs()
    return spread, torch.count_nonzero(spread), torch.sort(spread.reshape(-1)).values if ordered else None


def _energy_weights(masked: list[torch.Tensor]) -> torch.Tensor:
    """Each model's mean squared task vector, as a share of their sum
    (equal shares when the sum is about 0)."""
    energy = torch.stack([m.square().mean() for m in masked])
    total = torch.sum(energy).item()
    if abs(total) < 1e-6:
        return torch.ones_like(energy) / energy.shape[0]
    return energy / total


def _merge(base: torch.Tensor, masked: list[torch.Tensor], weights: torch.Tensor) -> torch.Tensor:
    """The elementwise rest, on flat tensors. Erase: keep an entry of a task
    vector only where its sign is the sign of the entries' sum over the
    models (a zero sum counts as positive); then average the kept entries,
    weighted by energy. Sums over the models are adds in float32 rounded once,
    as a sum over a stacked dimension is, so ``torch.compile`` can fuse it all
    (``_fused_merge``) without changing a bit."""
    dtype = base.dtype

    def rnd(t: torch.Tensor, to: torch.dtype) -> torch.Tensor:
        return t.to(to)

    positive = sum_over_models(masked, dtype, rnd) >= 0
    kept = [weights[j] * torch.where(positive, m > 0, m < 0).to(dtype) for j, m in enumerate(masked)]
    total = sum_over_models([m * k for m, k in zip(masked, kept)], dtype, rnd)
    return base + total / sum_over_models(kept, dtype, rnd).clamp(min=1e-6)


_FUSED = None


def _fused_merge():
    """``_merge`` compiled into one pass (float32 and float64 only: narrower
    types would need the explicit round trips of task arithmetic's kernel)."""
    global _FUSED
    if _FUSED is None:
        _FUSED = torch.compile(_merge, dynamic=True)
    return _FUSED


def sce(x: TensorInputs, p: dict) -> torch.Tensor:
    models = x.non_base
    if not models:
        return x.base
    base = x.base
    deltas = [x.delta(i) for i in models]
    if p["select_topk"] < 1:
        keep = _select(x, deltas, p["select_topk"])
        deltas = [d * keep for d in deltas]
    fuse = x.fuse and base.dtype in (torch.float32, torch.float64)
    merge = _fused_merge() if fuse else _merge
    merged = merge(base.reshape(-1), [d.reshape(-1) for d in deltas], _energy_weights(deltas))
    return merged.view(base.shape)


# -- the declarations ---------------------------------------------------------

SCE = MergeMethod(
    "sce",
    sce,
    (
        INT8_MASK,
        Param(
            "select_topk",
            float,
            default=1.0,
            limits=(0.0, 1.0),
            bounds=(0.1, 1.0),
            doc="fraction of the entries kept, those varying most across models",
        ),
    ),
    base="required",
    reference="https://arxiv.org/abs/2408.07990",
)
METHODS = (SCE,)
