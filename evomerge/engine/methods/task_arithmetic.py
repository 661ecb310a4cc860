"""Generalized task arithmetic: task_arithmetic, TIES, DARE, breadcrumbs, DELLA.

All of them are: sparsify each task vector (x_i - base), weight it, optionally
keep only the entries that agree with the majority sign (TIES consensus), sum,
optionally normalize by the weights that were kept, scale by lambda, add to
the base. Semantics follow mergekit 0.1.5.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

import torch

from evomerge.engine.methods.base import MergeMethod, Param, TensorInputs
from evomerge.engine.methods.params import DENSITY, EPSILON, GAMMA, INT8_MASK, LAMBDA, WEIGHT
from evomerge.errors import EvomergeError

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

    The in-place merger keeps the magnitude order resident. The one-shot path
    finds the boundary values by selection; only entries equal to a boundary
    value need a tie rule: by position that is a running count, for another
    order a full sort, and only when equal magnitudes straddle the cut (in
    bfloat16 and float16 they nearly always do, so those sort at once).
    """
    n = d.numel()
    hi_rank = lo_rank + count - 1
    if count <= 0:
        return torch.zeros_like(d, dtype=torch.bool)
    if x.resident:
        return _positions_mask(x.magnitude_order(i, order)[0][lo_rank : hi_rank + 1], d)
    if order is not None and d.dtype in (torch.bfloat16, torch.float16):
        return _positions_mask(order(d)[lo_rank : hi_rank + 1], d)
    m = d.abs().reshape(-1).float()
    lo = torch.kthvalue(m, lo_rank + 1).values
    hi = torch.kthvalue(m, hi_rank + 1).values if hi_rank < n - 1 else None
    keep = m > lo if hi is None else (m > lo) & (m < hi)
    for v in (lo,) if hi is None or hi == lo else (lo, hi):
        equal = m == v
        below = (m < v).sum()
        if order is not None:
            if below < lo_rank or below + equal.sum() - 1 > hi_rank:  # the equal run straddles the cut
                return _positions_mask(order(d)[lo_rank : hi_rank + 1], d)
            keep |= equal
            continue
        rank = below + equal.cumsum(0) - 1
        keep |= equal & (rank >= lo_rank) & (rank <= hi_rank)
    return keep.reshape(d.shape)


def _positions_mask(flat_indices: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
    keep = torch.zeros(d.numel(), dtype=torch.bool, device=d.device)
    keep[flat_indices.long()] = True
    return keep.reshape(d.shape)


@dataclass
class _Sparse:
    """How one task vector is sparsified, without applying it yet: the kept
    entries, the L1 rescale factor, and the dtype the masking happens in
    (mergekit's work dtype). Kept entries are either a mask, or (in place) the
    magnitudes strictly between two cut values, which the combine kernel tests
    itself, plus the listed ``ties``: entries equal to a cut value that the
    tie order keeps."""

    keep: torch.Tensor | None = None
    cut: torch.Tensor | None = None  # [low, high] magnitudes, exclusive; or ranks, inclusive
    rank: torch.Tensor | None = None  # when set, ``cut`` bounds these ranks instead
    ties: torch.Tensor | None = None  # flat indices
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


# Beyond one tie in this many entries, the kernel tests magnitude ranks.
_MAX_TIE_SHARE = 256


def _rank_window(x: TensorInputs, i: int, d: torch.Tensor, lo_rank: int, count: int, order, rescale: bool) -> _Sparse:
    if x.resident and not rescale and count > 0:
        # Leave the test to the combine kernel, which then reads only the task
        # vector itself: kept are the magnitudes strictly between the values at
        # the window's two ends, plus the entries equal to one of those values
        # whose place in the tie order falls inside the window.
        # When the tie runs are long (bfloat16 task vectors are often
        # quantised to a few dozen magnitudes), fixing them up costs more than
        # a pass over each entry's rank, so the kernel tests ranks instead.
        perm, mags = x.magnitude_order(i, order)
        n = perm.numel()
        hi_rank = lo_rank + count - 1
        lo = mags[lo_rank]
        hi = mags[hi_rank] if hi_rank < n - 1 else torch.full_like(lo, float("inf"))
        lo_run_end = int(torch.searchsorted(mags, lo, right=True))
        hi_run_start = int(torch.searchsorted(mags, hi)) if hi_rank < n - 1 and hi != lo else hi_rank + 1
        if min(lo_run_end, hi_rank + 1) - lo_rank + hi_rank + 1 - hi_run_start > n // _MAX_TIE_SHARE:
            window = torch.tensor([lo_rank, hi_rank], dtype=torch.int32, device=perm.device)
            return _Sparse(cut=window, rank=x.magnitude_rank(i, order))
        ties = [perm[lo_rank : min(lo_run_end, hi_rank + 1)], perm[hi_run_start : hi_rank + 1]]
        return _Sparse(cut=torch.stack([lo, hi]), ties=torch.cat(ties).long())
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


def sum_over_models(tensors: list[torch.Tensor], dtype: torch.dtype, rnd: Callable) -> torch.Tensor:
    """Sum over models, accumulated in float32 (float64 for float64) and
    rounded once to ``dtype``, as mergekit's sum over a stacked dimension is
    (bit for bit in bf16 and fp16). Written as adds rather than
    stack().sum() so that torch.compile fuses it."""
    acc_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    acc = tensors[0].to(acc_dtype)
    for t in tensors[1:]:
        acc = acc + t.to(acc_dtype)
    return rnd(acc, dtype)


def _weighted_delta(d, keep, cut, rank, factor, work, weight, dtype, high, rnd) -> torch.Tensor:
    """One model's task vector, sparsified (by its mask, or by comparing its
    magnitude or rank with its cut), rescaled and weighted, in ``high``."""
    if rank is not None:
        keep = (rank >= cut[0:1]) & (rank <= cut[1:2])
    elif cut is not None:
        magnitude = d.abs()
        keep = (magnitude > cut[0:1]) & (magnitude < cut[1:2])
    d = d.to(high)
    if keep is not None and work == dtype and factor is None:
        d = d * keep.to(high)  # exact: no rounding
    elif keep is not None:
        masked = rnd(d, work) * keep.to(high)
        if factor is not None:
            masked = rnd(masked * factor, work)
        d = rnd(masked, dtype)
    return rnd(d * weight, dtype)


def _mix(weighted, w, consensus: bool, dtype, wide: bool, high, rnd) -> tuple[torch.Tensor, torch.Tensor]:
    """The sum of the weighted task vectors (with TIES consensus, only the
    entries agreeing with the sign of the sum) and what normalize divides by."""
    if consensus:
        # TIES: keep only entries whose sign agrees with the sign of the sum.
        # Rounding a nonzero sum of narrow values never makes it zero or
        # flips its sign, so the sign test can skip that round trip.
        positive = sum_over_models(weighted, dtype, rnd if not wide else lambda t, to: t) >= 0
        agree = [torch.where(positive, wd > 0, wd < 0).to(high) for wd in weighted]
        mixed = sum_over_models([wd * a for wd, a in zip(weighted, agree)], dtype, rnd)
        divisor = sum_over_models([w[j] * a for j, a in enumerate(agree)], dtype, rnd)
        return mixed, torch.where(divisor == 0, torch.ones_like(divisor), divisor)
    mixed = sum_over_models(weighted, dtype, rnd)
    divisor = rnd(w.sum(), dtype)
    return mixed, torch.where(divisor.abs() < 1e-8, torch.ones_like(divisor), divisor)


def combine(
    base: torch.Tensor,
    deltas: list[torch.Tensor],
    keeps: list[torch.Tensor | None],
    cuts: list[torch.Tensor | None],
    ranks: list[torch.Tensor | None],
    factors: list[torch.Tensor | None],
    works: tuple[torch.dtype | None, ...],
    weights: torch.Tensor,
    lam: torch.Tensor | None,
    consensus: bool,
    normalize: bool,
    out: torch.Tensor | None = None,
    wide: bool = False,
    from_models: bool = False,
) -> torch.Tensor:
    """The elementwise part of generalized task arithmetic, on flat tensors.

    ``from_models``: ``deltas`` are the models' tensors themselves, and each
    task vector (model - base, rounded to the dtype as the eager subtraction
    rounds it) is taken here, in the same pass, instead of beforehand.

    Everything global (cut values, random masks, rescale factors) is decided
    before; what is left is elementwise, so ``torch.compile`` can fuse it into
    one pass (see ``fused_combine``) without changing a bit. With ``out``, the
    result is written there (converted to its dtype) and ``out`` returned.

    ``wide`` holds bfloat16 / float16 values in float32 and rounds them
    explicitly, only where an eager operation in the narrow dtype changes a
    result (products by a 0/1 mask, or of two narrow values, are exact in
    float32). Same bits as the eager narrow arithmetic (a test checks it), but
    compiled it needs a few round trips per entry, where inductor's precision
    emulation of the narrow code adds one after every operation.
    """
    dtype = base.dtype
    wide = wide and dtype in (torch.bfloat16, torch.float16)
    high = torch.float32 if wide else dtype

    def rnd(t: torch.Tensor, to: torch.dtype) -> torch.Tensor:
        return t.to(to).to(high) if wide else t.to(to)

    w = weights.to(high)
    if from_models:
        deltas = [rnd(m.to(high) - base.to(high), dtype) for m in deltas]
    weighted = [
        _weighted_delta(d, keeps[j], cuts[j], ranks[j], factors[j], works[j] or dtype, w[j], dtype, high, rnd)
        for j, d in enumerate(deltas)
    ]
    mixed, divisor = _mix(weighted, w, consensus, dtype, wide, high, rnd)
    if normalize:
        mixed = rnd(mixed / divisor, dtype)
    if lam is not None:
        # A one-element float32 tensor: the product is taken in float32
        # (float64 for float64 tensors) and rounded back, as PyTorch does it.
        mixed = rnd(mixed * lam, dtype)
    # Converting to dtype rounds once, as rnd() would.
    result = (base.to(high) + mixed).to(dtype)
    return result if out is None else out.copy_(result)


_FUSED = None


def fused_combine():
    """``combine`` compiled with torch.compile into a single fused pass.

    Called with ``wide=True``. ``emulate_precision_casts`` keeps the explicit
    narrow round trips that inductor would otherwise drop, so the result is
    bit-identical to eager ``combine`` (a test checks it); shapes are
    dynamic, so one compilation serves every tensor.
    """
    global _FUSED
    if _FUSED is None:
        import torch._inductor.config as inductor_config

        inductor_config.emulate_precision_casts = True
        # One variant per pattern of masked / unmasked / rescaled models.
        torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
        _FUSED = torch.compile(combine, dynamic=True)
    return _FUSED


def _keeps_at(at: torch.Tensor, plans: list, deltas: list[torch.Tensor]) -> list[torch.Tensor | None]:
    """Each model's explicit keep mask at the entries ``at`` (sorted), where
    some model's magnitude equals its cut value: there the fast path's
    comparison with the cut cannot decide, so those entries are recomputed
    exactly with these masks."""
    keeps: list[torch.Tensor | None] = []
    for s, d in zip(plans, deltas):
        if s.rank is not None:
            keeps.append((s.rank[at] >= s.cut[0]) & (s.rank[at] <= s.cut[1]))
            continue
        if s.cut is None:
            keeps.append(None if s.keep is None else s.keep.reshape(-1)[at])
            continue
        magnitude = d[at].abs()
        keep = (magnitude > s.cut[0:1]) & (magnitude < s.cut[1:2])
        if s.ties is not None:
            # ``at`` is sorted, so a binary search finds each tie's place.
            keep[torch.searchsorted(at, s.ties)] = True
        keeps.append(keep)
    return keeps


def generalized_task_arithmetic(x: TensorInputs, p: dict, *, consensus: bool, sparsify: str | None) -> torch.Tensor:
    """base + lambda * combine(weight_i * sparsify(x_i - base))."""
    base = x.base
    models = x.non_base
    if not models:
        return base
    # Without caches and without sparsifying, the task vectors are taken in
    # the kernel's own pass over the models (one pass instead of one per model).
    from_models = sparsify is None and not x.resident
    if from_models:
        deltas = [x.tensors[i].reshape(-1) for i in models]
    else:
        deltas = [x.delta(i).reshape(-1) for i in models]
    plans = [_sparsify(x, i, x.delta(i), sparsify, p, j) if sparsify else _Sparse() for j, i in enumerate(models)]
    flat = lambda t: None if t is None else t.reshape(-1)  # noqa: E731
    kernel = fused_combine() if x.fuse else combine
    weights = torch.tensor(p["weight"], dtype=base.dtype, device=base.device)
    # A one-element float32 tensor, cast back after the product: that is how
    # PyTorch computes "tensor * python float", and a 0-d tensor would become
    # a double-precision scalar under torch.compile. x * 1 == x: lambda 1
    # (the usual value) skips the product and its rounding.
    lam = None if p["lambda"] == 1.0 else torch.tensor([p["lambda"]], dtype=torch.float32, device=base.device)
    factors = [s.factor for s in plans]
    works = tuple(s.work for s in plans)
    consensus_normalize = (consensus, p["normalize"])
    out = kernel(
        base.reshape(-1),
        deltas,
        [flat(s.keep) for s in plans],
        [s.cut for s in plans],
        [s.rank for s in plans],
        factors,
        works,
        weights,
        lam,
        *consensus_normalize,
        x.out.reshape(-1) if x.out is not None else None,
        wide=x.fuse,
        from_models=from_models,
    )
    ties = [s.ties for s in plans if s.ties is not None and s.ties.numel()]
    if ties:
        at = torch.unique(torch.cat(ties))
        keeps = _keeps_at(at, plans, deltas)
        common = (factors, works, weights, lam, *consensus_normalize)
        out[at] = combine(base.reshape(-1)[at], [d[at] for d in deltas], keeps, *([[None] * len(deltas)] * 2), *common)
    return x.out if x.out is not None else out.reshape(base.shape)


# -- the declarations ---------------------------------------------------------

_REFERENCES = {
    "task_arithmetic": "https://arxiv.org/abs/2212.04089",
    "ties": "https://arxiv.org/abs/2306.01708",
    "dare": "https://arxiv.org/abs/2311.03099",
    "breadcrumbs": "https://arxiv.org/abs/2312.06795",
    "della": "https://arxiv.org/abs/2406.11617",
}


def _family_member(
    name: str, consensus: bool, sparsify: str | None, normalize: bool, rescale: bool, ref: str
) -> MergeMethod:
    params = [
        INT8_MASK,
        Param("normalize", bool, default=normalize, doc="divide by the sum of the weights kept"),
        Param("rescale", bool, default=rescale, doc="rescale sparsified vectors to their original L1 norm"),
        LAMBDA,
        WEIGHT,
        DENSITY,
    ]
    if sparsify == "magnitude_outliers":
        params.append(GAMMA)
    if sparsify == "della":
        params.append(EPSILON)
    return MergeMethod(
        name=name,
        fn=partial(generalized_task_arithmetic, consensus=consensus, sparsify=sparsify),
        params=tuple(params),
        base="required",
        random=sparsify in ("random", "della"),
        options={"consensus": consensus, "sparsify": sparsify},
        reference=_REFERENCES[ref],
    )


# The family, one row per name: TIES consensus, sparsification, the defaults
# of normalize and rescale, and the paper.
_FAMILY = (
    ("task_arithmetic", False, None, False, False, "task_arithmetic"),
    ("ties", True, "magnitude", True, False, "ties"),
    ("dare_ties", True, "random", False, True, "dare"),
    ("dare_linear", False, "random", False, True, "dare"),
    ("breadcrumbs", False, "magnitude_outliers", False, False, "breadcrumbs"),
    ("breadcrumbs_ties", True, "magnitude_outliers", False, False, "breadcrumbs"),
    ("della", True, "della", True, True, "della"),
    ("della_linear", False, "della", False, True, "della"),
)
METHODS = tuple(_family_member(*row) for row in _FAMILY)
