"""The methods the registry collects for mergekit parity (multislerp, nearswap, karcher, sce,
arcee_fusion, ram, ramplus_tl),
tensor by tensor against mergekit 0.1.5's own kernels, on inputs far apart
enough that each method's geometry shows (the tiny fine-tunes of the parity
tests sit close to their base), and at their edge cases."""

from __future__ import annotations

import pytest
import torch
from mergekit.merge_methods.base import PerInputValues, TensorGroup

from evomerge.engine.methods import METHODS, TensorInputs
from evomerge.errors import EvomergeError


def _ours(method: str, tensors, base_index=None, resident=False, **params) -> torch.Tensor:
    m = METHODS[method]
    p = {q.name: q.default for q in m.params}
    p.update(params)
    return m.fn(TensorInputs("w", list(tensors), base_index, seed=0, cache={}, resident=resident), p)


def _theirs(method: str, tensors, base_index=None, **params) -> torch.Tensor:
    from mergekit.merge_methods import registry

    group = TensorGroup.from_tensors([t.clone() for t in tensors], base_index=base_index)
    if "weight" in params:
        entries = [e for e in group.entries if not e.is_base]
        params["weight"] = PerInputValues([(e.id, w) for e, w in zip(entries, params["weight"])])
    return registry.get(method).merge_group(group, **params)


def _randn(*shape, seed=0, dtype=torch.float32):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).to(dtype)


# -- multislerp ------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("with_base", [False, True], ids=["no-base", "base"])
@pytest.mark.parametrize(
    "weights, normalize", [([0.2, 0.5, 0.3], True), ([1.0, 2.0, -0.5], True), ([0.7, 0.6, 0.1], False)]
)
def test_multislerp_is_mergekits_bit_for_bit(dtype, with_base, weights, normalize):
    tensors = [_randn(24, 16, seed=i, dtype=dtype) for i in range(4 if with_base else 3)]
    base_index = 3 if with_base else None
    kw = dict(weight=weights, normalize_weights=normalize, eps=1e-8)
    ours = _ours("multislerp", tensors, base_index, **kw)
    theirs = _theirs("multislerp", tensors, base_index, **kw)
    assert ours.dtype == theirs.dtype == dtype
    assert torch.equal(ours, theirs)
    # Not a weighted average: on inputs this far apart the sphere shows.
    models = tensors[:3]
    off = tensors[3] if with_base else 0
    w = torch.tensor(weights, dtype=torch.float64)
    w = w / w.sum() if normalize else w
    linear = off + sum(wi * (t.double() - off) for wi, t in zip(w, models))
    assert (ours.double() - linear).abs().max() > 1e-2


def test_multislerp_of_opposite_pair_falls_back_to_the_weighted_sum():
    a = _randn(8, 8)
    ours = _ours("multislerp", [a, -a], weight=[0.5, 0.5])
    assert torch.equal(ours, _theirs("multislerp", [a, -a], weight=[0.5, 0.5], normalize_weights=True, eps=1e-8))
    assert ours.abs().max() == 0


def test_multislerp_refuses_three_directions_that_cancel():
    a = _randn(8, 8)
    tensors = [a, -a, a]
    with pytest.raises(ValueError):
        _theirs("multislerp", tensors, weight=[0.5, 1.0, 0.5], normalize_weights=True, eps=1e-8)
    with pytest.raises(EvomergeError, match="cancel out.*change the weights"):
        _ours("multislerp", tensors, weight=[0.5, 1.0, 0.5])


def test_multislerp_of_one_model_is_that_model():
    base, a = _randn(5, seed=1), _randn(5, seed=2)
    assert torch.equal(_ours("multislerp", [a, base], 1, weight=[0.3]), a)


# -- karcher -----------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("max_iter, tol", [(0, 1e-5), (1, 1e-5), (3, 1e-5), (50, 1e-5), (50, 1e-2), (10, 0.0)])
def test_karcher_is_mergekits_bit_for_bit(dtype, max_iter, tol):
    tensors = [_randn(32, 8, seed=i, dtype=dtype) for i in range(3)] + [torch.zeros(32, 8, dtype=dtype)]
    ours = _ours("karcher", tensors, max_iter=max_iter, tol=tol)
    theirs = _theirs("karcher", tensors, max_iter=max_iter, tol=tol)
    assert ours.dtype == theirs.dtype == dtype
    assert torch.equal(ours, theirs)


def test_karcher_iterations_and_tolerance_matter():
    tensors = [_randn(32, 8, seed=i) for i in range(3)]
    first = _ours("karcher", tensors, max_iter=0, tol=1e-5)
    converged = _ours("karcher", tensors, max_iter=50, tol=1e-7)
    loose = _ours("karcher", tensors, max_iter=50, tol=0.5)
    assert (first - converged).abs().max() > 1e-4
    assert torch.equal(loose, first)  # the first step is already shorter than tol
    # The scale is the mean norm; the direction a unit vector.
    mean_norm = sum(torch.linalg.vector_norm(t) for t in tensors) / 3
    torch.testing.assert_close(torch.linalg.vector_norm(converged), mean_norm)


def test_karcher_of_zero_tensors_is_zero():
    zeros = [torch.zeros(4, 4), torch.zeros(4, 4)]
    assert torch.equal(_ours("karcher", zeros), _theirs("karcher", zeros))
    assert _ours("karcher", zeros).abs().max() == 0


# -- nearswap ------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("t", [0.0, 1e-3, 0.1, 0.5, 10.0])
def test_nearswap_is_mergekits_bit_for_bit(dtype, t):
    base = _randn(64, 16, seed=0, dtype=dtype)
    other = (base.float() + 0.3 * _randn(64, 16, seed=1)).to(dtype)
    ours = _ours("nearswap", [base, other], 0, t=t)
    assert torch.equal(ours, _theirs("nearswap", [base, other], 0, t=t))
    gap = (other.float() - base.float()).abs()
    if t == 0.0:
        assert torch.equal(ours, base)
    if t == 10.0:
        assert torch.equal(ours, other)
    if t == 0.1:  # near entries swapped, far ones moved by t
        near = gap <= 0.1
        assert near.any() and (~near).any()
        assert torch.equal(ours[near], other[near])
        if dtype == torch.float32:
            moved = (ours.float() - base.float()).abs()[~near]
            torch.testing.assert_close(moved, torch.full_like(moved, 0.1), rtol=0, atol=1e-5)


# -- sce ------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("select_topk", [0.0, 0.1, 0.3, 0.55, 0.999, 1.0])
@pytest.mark.parametrize("int8_mask", [False, True])
@pytest.mark.parametrize("resident", [False, True], ids=["to-disk", "in-place"])
def test_sce_is_mergekits_bit_for_bit(dtype, select_topk, int8_mask, resident):
    base = _randn(48, 32, seed=0, dtype=dtype)
    # Quantised task vectors: many equal variances straddle each selection cut.
    g = torch.Generator().manual_seed(1)
    models = [(base.float() + torch.randint(-3, 4, base.shape, generator=g) * 0.01).to(dtype) for _ in range(3)]
    models[0][:4] = base[:4]  # rows where one model has no task vector
    tensors = [base, *models]
    kw = dict(select_topk=select_topk, int8_mask=int8_mask)
    ours = _ours("sce", tensors, 0, resident=resident, **kw)
    assert torch.equal(ours, _theirs("sce", tensors, 0, **kw))
    if select_topk == 0.0:
        assert torch.equal(ours, base)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_sce_in_place_keeps_the_variance_and_selects_by_comparison(dtype, monkeypatch):
    """The in-place merger's cache keeps SCE's variance across candidates; a
    candidate selects by comparing with the cut value, and falls back on
    torch.topk (mergekit's choice among equal variances) only where equal
    values straddle the cut. Mergekit's bits either way."""
    base = _randn(64, 48, seed=0, dtype=dtype)
    models = [(base.float() + 0.1 * _randn(64, 48, seed=i)).to(dtype) for i in (1, 2)]
    tensors = [base, *models]
    cache = {}
    topk_calls = []
    real_topk = torch.topk

    def counting_topk(*a, **kw):
        topk_calls.append(1)
        return real_topk(*a, **kw)

    for select_topk in (0.1, 0.3, 0.55, 0.999):
        m = METHODS["sce"]
        p = {q.name: q.default for q in m.params} | {"select_topk": select_topk}
        monkeypatch.setattr(torch, "topk", counting_topk)
        ours = m.fn(TensorInputs("w", list(tensors), 0, seed=0, cache=cache, resident=True), p)
        monkeypatch.setattr(torch, "topk", real_topk)
        assert torch.equal(ours, _theirs("sce", tensors, 0, select_topk=select_topk, int8_mask=False))
    assert sum(k[0] == "sce_spread" for k in cache) == 1  # computed once, for every candidate
    if dtype == torch.float32:
        assert not topk_calls  # continuous variances: no ties at the cut
    else:
        assert topk_calls  # bfloat16 variances tie often


def test_sce_selection_and_erasure_have_effect():
    base = _randn(48, 32, seed=0)
    models = [base + 0.1 * _randn(48, 32, seed=i) for i in (1, 2, 3)]
    full = _ours("sce", [base, *models], 0, select_topk=1.0, int8_mask=False)
    some = _ours("sce", [base, *models], 0, select_topk=0.3, int8_mask=False)
    changed = (some != base).float().mean()
    assert 0.2 < changed <= 0.3 + 1e-6  # only the selected entries move
    assert not torch.equal(full, some)
    # Weighted by energy over the sign-agreeing models only: not the plain mean.
    mean = base + sum(m - base for m in models) / 3
    assert (full - mean).abs().max() > 1e-3


# -- declarations --------------------------------------------------------------------


def test_whole_number_parameters():
    p = METHODS["karcher"].param("max_iter")
    assert p.validate(3.0) == 3 and isinstance(p.validate(3.0), int)
    with pytest.raises(EvomergeError, match="whole number"):
        p.validate(2.5)


def test_declared_like_mergekit():
    from mergekit.merge_methods import registry

    for name in ("multislerp", "nearswap", "karcher", "sce", "arcee_fusion", "ram", "ramplus_tl"):
        theirs = {p.name: p for p in registry.get(name).spec.parameters}
        ours = METHODS[name]
        assert set(ours.param_names) == set(theirs), name
        for p in ours.params:
            t = theirs[p.name]
            assert p.required == t.required, (name, p.name)
            if not p.required:
                assert p.default == t.default, (name, p.name)
            assert (p.scope == "per_model") == (t.scope.value == "non_base"), (name, p.name)
        assert ours.base == registry.get(name).spec.contract.base.value, name


# -- arcee_fusion ---------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(64, 48), (300,)], ids=["2d", "1d"])
def test_arcee_fusion_is_mergekits_bit_for_bit(dtype, shape):
    base = _randn(*shape, seed=0, dtype=dtype)
    other = (base.float() + 0.2 * _randn(*shape, seed=1)).to(dtype)
    ours = _ours("arcee_fusion", [base, other], 0)
    theirs = _theirs("arcee_fusion", [base, other], 0)
    assert ours.dtype == theirs.dtype == torch.float32  # as mergekit: the mask is float32
    assert torch.equal(ours, theirs)
    took = ours == other.float()
    assert took.any() and (ours == base.float()).any()  # a selective fusion, neither input
    assert 0 < took.float().mean() < 0.5  # only the outliers of importance


def test_arcee_fusion_of_large_tensors_samples_reproducibly():
    """Above 1M entries the quartiles come from a 1M-entry sample, seeded per
    tensor and run seed (mergekit's is unseeded): the same seed, the same merge."""
    base = _randn(1100, 1000, seed=0)
    other = base + 0.2 * _randn(1100, 1000, seed=1)

    def merged(seed):
        return METHODS["arcee_fusion"].fn(TensorInputs("big", [base, other], 0, seed=seed, cache={}), {})

    a, b = merged(0), merged(0)
    assert torch.equal(a, b)
    took = (a == other).float().mean()
    exact = _theirs("arcee_fusion", [base, other], 0)  # mergekit's own, from another sample
    assert abs(took - (exact == other).float().mean()) < 0.01


# -- ram, ramplus_tl ----------------------------------------------------------------------


def _sparse_models(dtype, n=3):
    base = _randn(40, 24, seed=0, dtype=dtype)
    g = torch.Generator().manual_seed(5)
    models = []
    for i in range(n):
        d = 0.1 * torch.randn(base.shape, generator=g)
        d[torch.rand(base.shape, generator=g) < 0.5] = 0  # each model moves about half the entries
        d[0] = 0 if i else d[0]  # a row only model 0 moves
        models.append((base.float() + d).to(dtype))
    return [base, *models]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("epsilon", [0.0, 1e-5, 0.05])
def test_ram_is_mergekits_bit_for_bit(dtype, epsilon):
    tensors = _sparse_models(dtype)
    ours = _ours("ram", tensors, 0, epsilon=epsilon)
    assert torch.equal(ours, _theirs("ram", tensors, 0, epsilon=epsilon))
    if epsilon == 0.0 and dtype == torch.float32:
        base, models = tensors[0], tensors[1:]
        deltas = torch.stack([m - base for m in models])
        moved = (deltas != 0).sum(0)
        one = moved == 1
        # An entry one model moves takes that change whole ...
        torch.testing.assert_close((ours - base)[one], deltas.sum(0)[one])
        # ... one several models move, their mean change.
        several = moved > 1
        mean = deltas.sum(0) / moved.clamp(min=1)
        torch.testing.assert_close((ours - base)[several], mean[several])
        assert one.any() and several.any()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("r, alpha, epsilon", [(0.1, 0.2, 1e-5), (0.8, 5.0, 0.05), (0.0, 0.2, 1e-5), (0.5, 0.0, 1e-3)])
def test_ramplus_tl_is_mergekits_bit_for_bit(dtype, r, alpha, epsilon):
    tensors = _sparse_models(dtype)
    kw = dict(r=r, alpha=alpha, epsilon=epsilon)
    ours = _ours("ramplus_tl", tensors, 0, **kw)
    assert torch.equal(ours, _theirs("ramplus_tl", tensors, 0, **kw))
    assert ours.dtype == torch.float32  # as mergekit's: the boost is float32, and promotes bfloat16
    if dtype == torch.float32:
        plain = _ours("ram", tensors, 0, epsilon=epsilon)
        if r == 0.0 or alpha == 0.0:
            assert torch.equal(ours, plain)  # no boost: RAM itself
        else:
            assert not torch.equal(ours, plain)  # unique changes boosted


# -- search spaces ------------------------------------------------------------------------


@pytest.mark.parametrize(
    "method, search, fixed, base",
    [
        ("multislerp", {"weight": {"per": "layer"}}, {}, "m/base"),
        ("multislerp", {"weight": None}, {"normalize_weights": False}, None),
        ("nearswap", {"t": {"per": "gradient", "points": 3}}, {}, "m/base"),
        ("sce", {"select_topk": {"per": "layer"}}, {}, "m/base"),
        ("ramplus_tl", {"r": None, "alpha": {"per": "layer"}}, {"epsilon": 1e-4}, "m/base"),
    ],
)
def test_search_spaces_derive_from_the_declarations(method, search, fixed, base):
    """Genes take the declared search ranges; decoded points are valid recipes
    of the method, and encode back to the same point."""
    from pathlib import Path

    from evomerge.engine.recipe import Recipe
    from evomerge.search.space import SearchSpace, load_space_spec

    models = ["m/a"] if method == "nearswap" else ["m/a", "m/b"]
    spec, where = load_space_spec({"methods": [method], "search": search, "fixed": fixed}, Path("."))
    s = SearchSpace(spec, models=models, base=base, num_layers=4, tensor_names=None, where=where)
    declared = {p.name: p.bounds for p in METHODS[method].params}
    assert all((g.low, g.high) == declared[g.param] for g in s.genes)
    assert s.dim == len(s.genes) > 0
    recipe = s.decode([0.3] * s.dim)
    assert recipe.method == method
    Recipe.from_dict(recipe.model_dump(exclude_none=True))  # validates every value against the declarations
    assert s.decode_params(s.encode(recipe)).fingerprint() == recipe.fingerprint()


def test_tuning_knobs_are_not_searched():
    """Numerical knobs (eps, tol, epsilon, max_iter) have no search range: a
    space may fix them but not search them; karcher, ram and arcee_fusion
    have nothing to search."""
    searched = {name: [p.name for p in METHODS[name].params if p.searchable] for name in METHODS}
    assert searched["multislerp"] == ["weight"]
    assert searched["nearswap"] == ["t"]
    assert searched["sce"] == ["select_topk"]
    assert searched["ramplus_tl"] == ["r", "alpha"]
    assert searched["karcher"] == searched["ram"] == searched["arcee_fusion"] == []
