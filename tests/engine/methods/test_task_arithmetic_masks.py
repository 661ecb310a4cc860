"""Magnitude masks (TIES, breadcrumbs): the exact rank window, equal on both
merge paths, including the many equal magnitudes of bfloat16 weights."""

import pytest
import torch

from evomerge.engine.methods.base import TensorInputs
from evomerge.engine.methods.task_arithmetic import _rank_window_mask


def _reference(d: torch.Tensor, lo: int, count: int) -> torch.Tensor:
    order = torch.sort(d.abs().reshape(-1).float(), stable=True).indices
    keep = torch.zeros(d.numel(), dtype=torch.bool)
    keep[order[lo : lo + count]] = True
    return keep.reshape(d.shape)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("ties", [True, False])
def test_rank_window_masks_match_a_stable_sort_on_both_paths(dtype, ties):
    g = torch.Generator().manual_seed(1)
    for _ in range(150):
        n = int(torch.randint(1, 400, (), generator=g))
        shape = (n,) if n % 3 else (n // 3, 3)
        if ties:  # few distinct magnitudes: boundaries fall inside runs of equal values
            ft = torch.randint(-3, 4, shape, generator=g).to(dtype) * 0.5
        else:
            ft = torch.randn(shape, generator=g).to(dtype)
        base = torch.zeros_like(ft)
        lo = int(torch.randint(0, n, (), generator=g))
        count = int(torch.randint(0, n - lo + 1, (), generator=g))
        want = _reference(ft, lo, count)
        for resident in (True, False):
            x = TensorInputs("w", [base, ft], 0, seed=0, resident=resident)
            got = _rank_window_mask(x, 1, x.delta(1), lo, count)
            assert got.shape == ft.shape
            assert torch.equal(got, want), (resident, n, lo, count)
