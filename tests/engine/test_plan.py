"""The fused (torch.compile) in-place path gives the same bits as eager and
as the to-disk path."""

import pytest
import torch
from safetensors.torch import load_file

from evomerge.engine.merge import InPlaceMerger, merge_to_disk
from evomerge.engine.recipe import Recipe


@pytest.mark.slow
@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
@pytest.mark.parametrize("masks", ["cut values and tie fix-ups", "magnitude ranks"])
def test_fused_in_place_equals_disk(llama, tmp_path, dtype, masks, monkeypatch):
    # The kernel keeps magnitudes between two cut values and fixes up the
    # entries tied with them, or, where ties are many, tests magnitude ranks.
    from evomerge.engine.methods import base, task_arithmetic

    by_rank = masks == "magnitude ranks"
    monkeypatch.setattr(task_arithmetic, "_MAX_TIE_SHARE", 10**12 if by_rank else 1)
    rank_calls = []
    original = base.TensorInputs.magnitude_rank
    monkeypatch.setattr(
        base.TensorInputs, "magnitude_rank", lambda self, *a: rank_calls.append(1) or original(self, *a)
    )

    def recipe(method, w, density):
        return Recipe.from_dict(
            {
                "method": method,
                "base_model": str(llama.base),
                "sources": [
                    {"model": str(llama.ft[0]), "parameters": {"weight": w, "density": density}},
                    {"model": str(llama.ft[1]), "parameters": {"weight": [0.9, 0.1], "density": 0.7}},
                ],
                "parameters": {"lambda": 1.3} if method == "dare_ties" else None,
                "dtype": dtype,
            }
        )

    merger = InPlaceMerger(recipe("ties", 0.5, 0.5), allow_outside=True, fuse=True)
    assert merger.fuse
    for i, r in enumerate(
        [recipe("ties", 0.3, 0.4), recipe("dare_ties", 0.8, 0.6), recipe("breadcrumbs_ties", 0.5, 0.9)]
    ):
        disk = load_file(merge_to_disk(r, tmp_path / str(i), allow_outside=True, progress=False) / "model.safetensors")
        live = merger.apply(r).state_dict()
        changed = [k for k in disk if not torch.equal(live[k], disk[k])]
        assert not changed, changed[:3]
        assert any(not torch.equal(disk[k], load_file(llama.base / "model.safetensors")[k]) for k in disk)
    assert bool(rank_calls) == by_rank


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("consensus", [True, False])
def test_wide_arithmetic_rounds_as_the_narrow_dtype_does(dtype, consensus):
    # The compiled kernel holds narrow values in float32 and rounds only where
    # a narrow operation would change the result; eagerly it must give the
    # same bits as the plain narrow arithmetic, for every combination of
    # masks, rescale factors, work dtypes, weights and lambda.
    from evomerge.engine.methods.task_arithmetic import combine

    g = torch.Generator().manual_seed(0)
    n = 50_000
    base = torch.randn(n, generator=g).to(dtype)
    deltas = [(torch.randn(n, generator=g) * s).to(dtype) for s in (0.02, 0.05, 0.01)]
    keeps = [torch.rand(n, generator=g) < 0.6, None, torch.rand(n, generator=g) < 0.3]
    work = torch.float32 if dtype == torch.float16 else dtype
    factors = [torch.tensor(1.37, dtype=work), None, None]
    works = (work, None, work)
    cases = [([0.7, 0.35, 1.1], 1.3, True), ([0.31, -0.52, 0.9], 0.77, False), ([0.5, 0.5, 0.5], None, True)]
    for weights, lam, normalize in cases:
        args = (
            base,
            deltas,
            keeps,
            [None] * 3,
            [None] * 3,
            factors,
            works,
            torch.tensor(weights, dtype=dtype),
            None if lam is None else torch.tensor([lam], dtype=torch.float32),
            consensus,
            normalize,
        )
        narrow = combine(*args)
        wide = combine(*args, wide=True)
        assert wide.dtype == narrow.dtype == dtype
        assert torch.equal(wide, narrow)
        # Taking the task vectors from the models in the same pass (the
        # lean path) rounds them as the eager subtraction does.
        models = [(base + d).to(dtype) for d in deltas]
        from_models = (base, models, *args[2:])
        exact = (base, [m - base for m in models], *args[2:])
        assert torch.equal(combine(*from_models, wide=True, from_models=True), combine(*exact))
        # Rounding once at the end, in float32, gives other bits: the test sees them.
        wide_args = (base.float(), [d.float() for d in deltas], *args[2:7], args[7].float(), *args[8:])
        once = combine(*wide_args).to(dtype)
        assert not torch.equal(once, narrow)


@pytest.mark.slow
@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
def test_fused_lean_task_arithmetic_equals_disk(llama, tmp_path, dtype):
    # Lean: no task vectors kept; the kernel takes them from the models itself.
    def recipe(w, lam):
        sources = [
            {"model": str(llama.ft[0]), "parameters": {"weight": w}},
            {"model": str(llama.ft[1]), "parameters": {"weight": [0.9, 0.1]}},
        ]
        data = {"method": "task_arithmetic", "base_model": str(llama.base), "sources": sources, "dtype": dtype}
        return Recipe.from_dict({**data, "parameters": {"lambda": lam}})

    merger = InPlaceMerger(recipe(0.5, 1.0), allow_outside=True, fuse=True, memory="lean")
    assert merger.fuse and merger.strategy == "lean"
    for i, r in enumerate([recipe(0.3, 1.0), recipe(0.8, 1.3)]):
        disk = load_file(merge_to_disk(r, tmp_path / str(i), allow_outside=True, progress=False) / "model.safetensors")
        live = merger.apply(r).state_dict()
        changed = [k for k in disk if not torch.equal(live[k], disk[k])]
        assert not changed, changed[:3]


@pytest.mark.slow
@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
def test_fused_sce_in_place_equals_disk(llama, tmp_path, dtype, monkeypatch):
    # SCE in place: its variance is kept across candidates and, in float32,
    # the elementwise rest is compiled; the bits are the to-disk merge's.
    from evomerge.engine.methods import sce

    compiled = []
    original = sce._fused_merge
    monkeypatch.setattr(sce, "_fused_merge", lambda: compiled.append(1) or original())

    def recipe(select_topk):
        return Recipe.from_dict(
            {
                "method": "sce",
                "base_model": str(llama.base),
                "sources": [{"model": str(llama.base)}] + [{"model": str(m)} for m in llama.ft],
                "parameters": {"select_topk": select_topk},
                "dtype": dtype,
            }
        )

    merger = InPlaceMerger(recipe(0.5), allow_outside=True, fuse=True)
    base = load_file(llama.base / "model.safetensors")
    for i, select_topk in enumerate([0.2, 0.75, 1.0]):
        r = recipe(select_topk)
        disk = load_file(merge_to_disk(r, tmp_path / str(i), allow_outside=True, progress=False) / "model.safetensors")
        live = merger.apply(r).state_dict()
        changed = [k for k in disk if not torch.equal(live[k], disk[k])]
        assert not changed, changed[:3]
        assert any(not torch.equal(disk[k], base[k]) for k in disk)
    assert bool(compiled) == (dtype == "float32")
