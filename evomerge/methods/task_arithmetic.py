"""Generalized task arithmetic: task_arithmetic, TIES, DARE, breadcrumbs, DELLA.

All of them are: sparsify each task vector (x_i - base), weight it, optionally
keep only the entries that agree with the majority sign (TIES consensus), sum,
optionally normalize by the weights that were kept, scale by lambda, add to
the base. Semantics follow mergekit 0.1.5.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Optional

import torch

from evomerge.errors import EvomergeError
from evomerge.methods.base import TensorInputs

_EPS = 1e-7


def _rescale_l1(d: torch.Tensor, masked: torch.Tensor) -> torch.Tensor:
    # DARE/DELLA rescale: match the L1 norm of the unmasked task vector, so the
    # expected merged update equals the unmasked one.
    before = d.abs().sum()
    after = masked.abs().sum()
    if before < _EPS or after < _EPS:
        return masked
    return masked * (before / after)


# Tie orders: task vector -> its flat indices in ascending magnitude order.
# Which of several equal magnitudes straddling a density cut survive depends
# on the order a sort leaves them in. mergekit sorts with unstable sorts, whose
# tie order no other call reproduces, so for parity the masks rank ties by the
# very call mergekit makes, on the very magnitudes it sorts (float32 on the
# CPU, the compute dtype elsewhere). Ties are common in bfloat16 and do occur
# in float32 (a tiny float32 Qwen2 breadcrumbs merge already has one).


def _mergekit_magnitudes(d: torch.Tensor) -> torch.Tensor:
    w = d.abs().reshape(-1)
    return w.float() if w.device.type == "cpu" else w


def mergekit_topk_order(d: torch.Tensor) -> torch.Tensor:
    # mergekit's magnitude() keeps the first k of argsort(w, descending=True);
    # reversed, that is an ascending order whose top k are the same entries.
    return torch.argsort(_mergekit_magnitudes(d), descending=True).flip(0)


def mergekit_window_order(d: torch.Tensor) -> torch.Tensor:
    # mergekit's magnitude_outliers() keeps a window of sort(w).indices.
    return torch.sort(_mergekit_magnitudes(d), descending=False).indices


def _rank_window_mask(
    x: TensorInputs,
    i: int,
    d: torch.Tensor,
    lo_rank: int,
    count: int,
    order: Optional[Callable[[torch.Tensor], torch.Tensor]] = None,
) -> torch.Tensor:
    """Mask of the entries whose ascending magnitude rank lies in
    [lo_rank, lo_rank + count), equal magnitudes ranked by ``order`` (see the
    tie orders above), by position (a stable sort's rule) when None.

    The in-place merger keeps every entry's rank resident, so a candidate
    costs one comparison. The one-shot path finds the boundary values by
    selection; only the entries equal to a boundary value need a tie rule:
    by position that is a running count, for another order a full sort, and
    only when equal magnitudes straddle the cut. Both paths give the same mask.
    """
    n = d.numel()
    hi_rank = lo_rank + count - 1
    if count <= 0:
        return torch.zeros_like(d, dtype=torch.bool)
    if x.resident:
        return _window(x.magnitude_rank(i, order), lo_rank, hi_rank)
    m = d.abs().reshape(-1).float()
    lo = torch.kthvalue(m, lo_rank + 1).values
    hi = torch.kthvalue(m, hi_rank + 1).values if hi_rank < n - 1 else None
    keep = m > lo if hi is None else (m > lo) & (m < hi)
    for v in (lo,) if hi is None or hi == lo else (lo, hi):
        equal = m == v
        below = (m < v).sum()
        if order is not None:
            if below < lo_rank or below + equal.sum() - 1 > hi_rank:  # the equal run straddles the cut
                rank = torch.empty(n, dtype=torch.int64, device=m.device)
                rank[order(d)] = torch.arange(n, device=m.device)
                return _window(rank, lo_rank, hi_rank).reshape(d.shape)
            keep |= equal
            continue
        rank = below + equal.cumsum(0) - 1
        keep |= equal & (rank >= lo_rank) & (rank <= hi_rank)
    return keep.reshape(d.shape)


def _window(rank: torch.Tensor, lo_rank: int, hi_rank: int) -> torch.Tensor:
    keep = rank >= lo_rank
    return keep if hi_rank >= rank.numel() - 1 else keep & (rank <= hi_rank)


def _magnitude(x: TensorInputs, i: int, d: torch.Tensor, density: float, rescale: bool) -> torch.Tensor:
    if density >= 1:
        return d
    n = d.numel()
    k = max(1, int(density * n))
    masked = d * _rank_window_mask(x, i, d, n - k, k, mergekit_topk_order)
    return _rescale_l1(d, masked) if rescale else masked


def _magnitude_outliers(
    x: TensorInputs, i: int, d: torch.Tensor, density: float, gamma: float, rescale: bool
) -> torch.Tensor:
    if density >= 1:
        return d
    n = d.numel()
    keep_n = int(density * n)
    n_bottom = max(0, n - keep_n - int(gamma * n))
    masked = d * _rank_window_mask(x, i, d, n_bottom, keep_n, mergekit_window_order)
    return _rescale_l1(d, masked) if rescale else masked


def _work_dtype(d: torch.Tensor) -> torch.dtype:
    return d.dtype if d.device.type != "cpu" or d.dtype == torch.bfloat16 else torch.float32


def _random(x: TensorInputs, i: int, d: torch.Tensor, density: float, rescale: bool) -> torch.Tensor:
    if density >= 1:
        return d
    work = d.to(_work_dtype(d))
    mask = (torch.rand(d.shape, generator=x.generator(i), device=d.device, dtype=torch.float32) < density).to(work.dtype)
    masked = work * mask
    return (_rescale_l1(work, masked) if rescale else masked).to(d.dtype)


def _della(x: TensorInputs, i: int, d: torch.Tensor, density: float, epsilon: float, rescale: bool) -> torch.Tensor:
    if density >= 1:
        return d
    if density + epsilon >= 1 or density - epsilon <= 0:
        raise EvomergeError(
            f"della needs density +/- epsilon inside (0, 1), got density={density}, epsilon={epsilon}; "
            "lower epsilon or move density away from 0 and 1"
        )
    work = d.to(_work_dtype(d))
    rows = work.unsqueeze(0) if work.dim() < 2 else work.reshape(work.shape[0], -1)
    probs = (density - epsilon) + x.row_rank_norm(i) * (2 * epsilon)
    draw = torch.rand(rows.shape, generator=x.generator(i), device=d.device, dtype=torch.float32)
    masked = rows * (draw < probs).to(rows.dtype)
    out = _rescale_l1(rows, masked) if rescale else masked
    return out.to(d.dtype).reshape(d.shape)


def _sparsify(x: TensorInputs, i: int, d: torch.Tensor, how: str, p: dict, j: int) -> torch.Tensor:
    density = p["density"][j]
    if how == "magnitude":
        return _magnitude(x, i, d, density, p["rescale"])
    if how == "random":
        return _random(x, i, d, density, p["rescale"])
    if how == "magnitude_outliers":
        return _magnitude_outliers(x, i, d, density, p["gamma"][j], p["rescale"])
    if how == "della":
        return _della(x, i, d, density, p["epsilon"][j], p["rescale"])
    raise AssertionError(how)


def generalized_task_arithmetic(
    x: TensorInputs, p: dict, *, consensus: bool, sparsify: Optional[str]
) -> torch.Tensor:
    """base + lambda * combine(weight_i * sparsify(x_i - base))."""
    base = x.base
    models = x.non_base
    if not models:
        return base
    weights = torch.tensor(p["weight"], dtype=base.dtype, device=base.device)
    weighted = []
    for j, i in enumerate(models):
        d = x.delta(i)
        if sparsify:
            d = _sparsify(x, i, d, sparsify, p, j)
        weighted.append(d * weights[j])

    # Reduce over the stacked models, as mergekit does: a running sum rounds at
    # every step, which in bfloat16 differs from mergekit's in the last bit.
    stacked = torch.stack(weighted)
    if consensus:
        # TIES: keep only entries whose sign agrees with the sign of the sum.
        positive = stacked.sum(dim=0) >= 0
        agree = torch.where(positive, stacked > 0, stacked < 0).to(base.dtype)
        mixed = (stacked * agree).sum(dim=0)
        divisor = (weights.reshape(-1, *(1,) * base.dim()) * agree).sum(dim=0)
        divisor[divisor == 0] = 1
    else:
        mixed = stacked.sum(dim=0)
        divisor = weights.sum()
        if divisor.abs() < 1e-8:
            divisor = torch.ones_like(divisor)

    if p["normalize"]:
        mixed = mixed / divisor
    if p["lambda"] != 1:
        mixed = mixed * p["lambda"]
    return (base + mixed).to(base.dtype)
