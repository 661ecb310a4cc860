"""Generalized task arithmetic: task_arithmetic, TIES, DARE, breadcrumbs, DELLA.

All of them are: sparsify each task vector (x_i - base), weight it, optionally
keep only the entries that agree with the majority sign (TIES consensus), sum,
optionally normalize by the weights that were kept, scale by lambda, add to
the base. Semantics follow mergekit 0.1.5.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from evomerge.errors import EvomergeError
from evomerge.methods.base import TensorInputs

_EPS = 1e-7


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
    order: Callable[[torch.Tensor], torch.Tensor] | None = None,
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


@dataclass
class _Sparse:
    """How one task vector is sparsified, without applying it yet: the kept
    entries (a mask, or a window of resident magnitude ranks), the L1 rescale
    factor, and the dtype the masking happens in (mergekit's work dtype)."""

    keep: torch.Tensor | None = None
    rank: torch.Tensor | None = None
    window: tuple[int, int] = (0, 0)
    factor: torch.Tensor | None = None
    work: torch.dtype | None = None


def _l1_factor(d: torch.Tensor, keep: torch.Tensor) -> torch.Tensor | None:
    # DARE/DELLA rescale: match the L1 norm of the unmasked task vector, so the
    # expected merged update equals the unmasked one (mergekit's RescaleNorm.l1).
    before = d.abs().sum()
    after = (d * keep.to(d.dtype)).abs().sum()
    if before < _EPS or after < _EPS:
        return None
    return before / after


def _rank_window(x: TensorInputs, i: int, d: torch.Tensor, lo_rank: int, count: int, order, rescale: bool) -> _Sparse:
    if x.resident and not rescale and count > 0:
        # Leave the comparison to the combine kernel: one pass over the ranks.
        return _Sparse(rank=x.magnitude_rank(i, order), window=(lo_rank, lo_rank + count - 1))
    keep = _rank_window_mask(x, i, d, lo_rank, count, order)
    return _Sparse(keep=keep, factor=_l1_factor(d, keep) if rescale else None)


def _magnitude(x: TensorInputs, i: int, d: torch.Tensor, density: float, rescale: bool) -> _Sparse:
    if density >= 1:
        return _Sparse()
    n = d.numel()
    k = max(1, int(density * n))
    return _rank_window(x, i, d, n - k, k, mergekit_topk_order, rescale)


def _magnitude_outliers(
    x: TensorInputs, i: int, d: torch.Tensor, density: float, gamma: float, rescale: bool
) -> _Sparse:
    if density >= 1:
        return _Sparse()
    n = d.numel()
    keep_n = int(density * n)
    n_bottom = max(0, n - keep_n - int(gamma * n))
    return _rank_window(x, i, d, n_bottom, keep_n, mergekit_window_order, rescale)


def _work_dtype(d: torch.Tensor) -> torch.dtype:
    return d.dtype if d.device.type != "cpu" or d.dtype == torch.bfloat16 else torch.float32


def _random(x: TensorInputs, i: int, d: torch.Tensor, density: float, rescale: bool) -> _Sparse:
    if density >= 1:
        return _Sparse()
    work = _work_dtype(d)
    keep = torch.rand(d.shape, generator=x.generator(i), device=d.device, dtype=torch.float32) < density
    return _Sparse(keep=keep, factor=_l1_factor(d.to(work), keep) if rescale else None, work=work)


def _della(x: TensorInputs, i: int, d: torch.Tensor, density: float, epsilon: float, rescale: bool) -> _Sparse:
    if density >= 1:
        return _Sparse()
    if density + epsilon >= 1 or density - epsilon <= 0:
        raise EvomergeError(
            f"della needs density +/- epsilon inside (0, 1), got density={density}, epsilon={epsilon}; "
            "lower epsilon or move density away from 0 and 1"
        )
    work = _work_dtype(d)
    # Keep probabilities rise with the entry's magnitude rank within its row.
    probs = (density - epsilon) + x.row_rank_norm(i) * (2 * epsilon)
    draw = torch.rand(probs.shape, generator=x.generator(i), device=d.device, dtype=torch.float32)
    keep = (draw < probs).reshape(d.shape)
    return _Sparse(keep=keep, factor=_l1_factor(d.to(work), keep) if rescale else None, work=work)


def _sparsify(x: TensorInputs, i: int, d: torch.Tensor, how: str, p: dict, j: int) -> _Sparse:
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


def _sum(tensors: list[torch.Tensor]) -> torch.Tensor:
    """Sum over models, accumulated in float32 and rounded once, as mergekit's
    sum over a stacked dimension is (bit for bit in bf16 and fp16). Written
    as adds rather than stack().sum() so that torch.compile fuses it."""
    dtype = tensors[0].dtype
    acc_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    acc = tensors[0].to(acc_dtype)
    for t in tensors[1:]:
        acc = acc + t.to(acc_dtype)
    return acc.to(dtype)


def combine(
    base: torch.Tensor,
    deltas: list[torch.Tensor],
    keeps: list[torch.Tensor | None],
    ranks: list[torch.Tensor | None],
    windows: torch.Tensor,
    factors: list[torch.Tensor | None],
    works: tuple[torch.dtype | None, ...],
    weights: torch.Tensor,
    lam: torch.Tensor,
    consensus: bool,
    normalize: bool,
) -> torch.Tensor:
    """The elementwise part of generalized task arithmetic, on flat tensors.

    Everything global (thresholds, ranks, random masks, rescale factors) is
    decided before; what is left is elementwise, so ``torch.compile`` can fuse
    it into one pass (see ``fused_combine``) without changing a bit.
    """
    weighted = []
    for j, d in enumerate(deltas):
        work = works[j] or d.dtype
        keep = keeps[j]
        if ranks[j] is not None:
            keep = (ranks[j] >= windows[j, 0]) & (ranks[j] <= windows[j, 1])
        if keep is not None:
            masked = d.to(work) * keep.to(work)
            if factors[j] is not None:
                masked = masked * factors[j]
            d = masked.to(d.dtype)
        weighted.append(d * weights[j])

    if consensus:
        # TIES: keep only entries whose sign agrees with the sign of the sum.
        positive = _sum(weighted) >= 0
        agree = [torch.where(positive, wd > 0, wd < 0).to(base.dtype) for wd in weighted]
        mixed = _sum([wd * a for wd, a in zip(weighted, agree)])
        divisor = _sum([weights[j] * a for j, a in enumerate(agree)])
        divisor = torch.where(divisor == 0, torch.ones_like(divisor), divisor)
    else:
        mixed = _sum(weighted)
        divisor = weights.sum()
        divisor = torch.where(divisor.abs() < 1e-8, torch.ones_like(divisor), divisor)

    if normalize:
        mixed = mixed / divisor
    mixed = (mixed * lam).to(mixed.dtype)
    return (base + mixed).to(base.dtype)


_FUSED = None


def fused_combine():
    """``combine`` compiled with torch.compile into a single fused pass.

    ``emulate_precision_casts`` makes the fused code round wherever eager
    PyTorch rounds, so the result is bit-identical to ``combine`` (a test
    checks it); shapes are dynamic, so one compilation serves every tensor.
    """
    global _FUSED
    if _FUSED is None:
        import torch._inductor.config as inductor_config

        inductor_config.emulate_precision_casts = True
        # One variant per pattern of masked / unmasked / rescaled models.
        torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
        _FUSED = torch.compile(combine, dynamic=True)
    return _FUSED


def generalized_task_arithmetic(x: TensorInputs, p: dict, *, consensus: bool, sparsify: str | None) -> torch.Tensor:
    """base + lambda * combine(weight_i * sparsify(x_i - base))."""
    base = x.base
    models = x.non_base
    if not models:
        return base
    deltas = [x.delta(i) for i in models]
    plans = [
        _sparsify(x, i, d, sparsify, p, j) if sparsify else _Sparse() for j, (i, d) in enumerate(zip(models, deltas))
    ]
    flat = lambda t: None if t is None else t.reshape(-1)  # noqa: E731
    kernel = fused_combine() if x.fuse else combine
    out = kernel(
        base.reshape(-1),
        [d.reshape(-1) for d in deltas],
        [flat(s.keep) for s in plans],
        [flat(s.rank) for s in plans],
        torch.tensor([s.window for s in plans], dtype=torch.int64, device=base.device),
        [s.factor for s in plans],
        tuple(s.work for s in plans),
        torch.tensor(p["weight"], dtype=base.dtype, device=base.device),
        # A one-element float32 tensor, cast back after the product: that is
        # how PyTorch computes "tensor * python float", and a 0-d tensor would
        # become a double-precision scalar under torch.compile. x * 1 == x,
        # so always multiplying keeps one compiled variant, not two.
        torch.tensor([p["lambda"]], dtype=torch.float32, device=base.device),
        consensus,
        p["normalize"],
    )
    return out.reshape(base.shape)
