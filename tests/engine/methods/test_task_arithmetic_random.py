"""Random-mask methods (dare_ties, dare_linear, della, della_linear):
reproducible per seed, keeping the fraction ``density`` asks for, and with
rescaling unbiased: on average they give the unmasked task-arithmetic merge."""

import hashlib
import math

import pytest
import torch
from helpers import read_tensors

from evomerge.engine.merge import merge_to_disk
from evomerge.engine.methods import METHODS, TensorInputs
from evomerge.engine.recipe import Recipe
from evomerge.errors import EvomergeError

RANDOM = ["dare_ties", "dare_linear", "della", "della_linear"]
DARE = ["dare_ties", "dare_linear"]
DELLA = ["della", "della_linear"]


def test_the_random_methods_are_the_ones_flagged_random():
    assert sorted(m for m, method in METHODS.items() if method.random) == sorted(RANDOM)


# -- helpers -----------------------------------------------------------------------


def _params(method: str, n_models: int, **over) -> dict:
    """A full parameter dict as merge_tensor passes it: shared scalars,
    per-model lists aligned with the non-base inputs."""
    out = {}
    for p in METHODS[method].params:
        value = over.get(p.name, 1.0 if p.required else p.default)
        if p.scope != "shared" and not isinstance(value, list):
            value = [value] * n_models
        out[p.name] = value
    return out


def _merge(method, base, models, seed, name="model.layers.0.mlp.up_proj.weight", **params):
    x = TensorInputs(name, [base, *models], 0, seed)
    return METHODS[method].fn(x, _params(method, len(models), **params))


def _binomial_tol(p: float, n: int, sigmas: float = 6.0) -> float:
    """Tolerance on an observed fraction of n Bernoulli(p) draws."""
    return sigmas * math.sqrt(p * (1 - p) / n)


def _recipe(family, method: str) -> Recipe:
    params = {"weight": [0.7, 0.3], "density": 0.5}
    if method in DELLA:
        params["epsilon"] = 0.1
    return Recipe.from_dict(
        {
            "method": method,
            "base_model": str(family.base),
            "sources": [
                {"model": str(family.ft[0]), "parameters": params},
                {"model": str(family.ft[1]), "parameters": {**params, "weight": 0.6, "density": [0.8, 0.3]}},
                {"model": str(family.base)},
            ],
            "dtype": "float32",
        }
    )


def _shas(folder) -> dict:
    """sha256 of every weight file of a merged model folder."""
    shas = {f.name: hashlib.sha256(f.read_bytes()).hexdigest() for f in sorted(folder.glob("*.safetensors"))}
    assert shas
    return shas


# -- reproducibility ------------------------------------------------------------------


@pytest.mark.parametrize("method", RANDOM)
def test_same_seed_is_bit_identical_and_another_seed_differs(family, method, tmp_path):
    recipe = _recipe(family, method)
    kw = dict(allow_outside=True, progress=False)
    a = merge_to_disk(recipe, tmp_path / "a", seed=11, **kw)
    b = merge_to_disk(recipe, tmp_path / "b", seed=11, **kw)
    c = merge_to_disk(recipe, tmp_path / "c", seed=12, **kw)
    ta, tb, tc = read_tensors(a), read_tensors(b), read_tensors(c)

    assert _shas(a) == _shas(b)
    assert ta.keys() == tb.keys() == tc.keys()
    assert all(torch.equal(ta[k], tb[k]) for k in ta)

    assert _shas(a).keys() == _shas(c).keys() and _shas(a) != _shas(c)
    # Every tensor gets its own masks, so a new seed changes every tensor,
    # not just one.
    changed = [k for k in ta if not torch.equal(ta[k], tc[k])]
    assert sorted(changed) == sorted(ta)


@pytest.mark.parametrize("method", ["dare_ties", "della_linear"])
def test_seed_in_the_recipe_is_the_seed_used(llama, method, tmp_path):
    recipe = _recipe(llama, method)
    kw = dict(allow_outside=True, progress=False)
    by_arg = merge_to_disk(recipe, tmp_path / "arg", seed=3, **kw)
    by_recipe = merge_to_disk(recipe.model_copy(update={"seed": 3}), tmp_path / "recipe", **kw)
    default = merge_to_disk(recipe, tmp_path / "default", **kw)  # recipe seed 0
    assert _shas(by_arg) == _shas(by_recipe)
    assert _shas(by_arg) != _shas(default)


def test_masks_depend_on_seed_tensor_name_and_model_index():
    g = torch.Generator().manual_seed(0)
    d = torch.randn(64, 256, generator=g, dtype=torch.float64)
    base = torch.zeros_like(d)
    kw = dict(density=0.5, rescale=False, weight=1.0, normalize=False)

    def mask(seed, name="t.weight"):
        out = _merge("dare_linear", base, [d], seed, name=name, **kw)
        return out != 0

    assert torch.equal(mask(1), mask(1))
    assert not torch.equal(mask(1), mask(2))
    assert not torch.equal(mask(1, "t.weight"), mask(1, "u.weight"))
    # Two models in one tensor draw different masks (else DARE would keep
    # the same coordinates of every task vector).
    both = TensorInputs("t.weight", [base, d, d.clone()], 0, 1)
    sparse = METHODS["dare_linear"].fn
    p = _params("dare_linear", 2, **kw)
    p["weight"] = [1.0, 0.0]
    first = sparse(both, p) != 0
    p["weight"] = [0.0, 1.0]
    second = sparse(TensorInputs("t.weight", [base, d, d.clone()], 0, 1), p) != 0
    assert torch.equal(first, mask(1))
    assert not torch.equal(first, second)
    agree = (first == second).float().mean().item()
    assert abs(agree - 0.5) < _binomial_tol(0.5, d.numel())  # independent draws agree half the time


# -- kept fraction ----------------------------------------------------------------------

DENSITIES = [0.1, 0.3, 0.5, 0.9]


@pytest.mark.parametrize("method", DARE)
@pytest.mark.parametrize("density", DENSITIES)
def test_dare_keeps_density_and_rescales_to_the_l1_norm(method, density):
    g = torch.Generator().manual_seed(7)
    delta = torch.randn(128, 512, generator=g) * 3.0  # no zeros: every zero is a dropped entry
    base = torch.zeros_like(delta)
    n = delta.numel()
    common = dict(weight=1.0, normalize=False, density=density)

    plain = _merge(method, base, [delta], seed=5, rescale=False, **common)
    kept = plain != 0
    assert abs(kept.float().mean().item() - density) < _binomial_tol(density, n)
    # Kept entries are untouched, dropped ones are exactly zero.
    assert torch.equal(plain[kept], delta[kept])

    scaled = _merge(method, base, [delta], seed=5, rescale=True, **common)
    assert torch.equal(scaled != 0, kept)  # the same mask for the same seed
    ratio = scaled[kept] / delta[kept]
    factor = delta.abs().sum() / delta[kept].abs().sum()
    assert torch.allclose(ratio, factor.expand_as(ratio), rtol=1e-5)
    assert scaled.abs().sum().item() == pytest.approx(delta.abs().sum().item(), rel=1e-5)
    # The L1 rescale is about 1 / density (the kept entries are a random sample).
    assert factor.item() * density == pytest.approx(1.0, abs=6 * math.sqrt((1 - density) / (density * n)) * 2)


@pytest.mark.parametrize("method", DARE + DELLA)
def test_density_one_keeps_everything(method):
    g = torch.Generator().manual_seed(1)
    delta = torch.randn(32, 64, generator=g)
    base = torch.randn(32, 64, generator=g)
    out = _merge(method, base, [base + delta], seed=3, density=1.0, weight=1.0, normalize=False, rescale=True)
    assert torch.allclose(out, base + delta, atol=1e-6, rtol=0)


def _della_expected_probs(delta: torch.Tensor, density: float, epsilon: float) -> torch.Tensor:
    """DELLA's keep probability (mergekit's della_magprune): per row, linear
    in the magnitude rank from density - epsilon (smallest) to density +
    epsilon (largest)."""
    width = delta.shape[1]
    ranks = delta.abs().argsort(dim=1).argsort(dim=1).double()
    return (density - epsilon) + ranks / (width - 1) * (2 * epsilon)


@pytest.mark.parametrize("method", DELLA)
@pytest.mark.parametrize("density,epsilon", [(0.2, 0.1), (0.5, 0.15), (0.5, 0.4), (0.8, 0.1)])
def test_della_keep_probability_follows_magnitude_and_averages_density(method, density, epsilon):
    g = torch.Generator().manual_seed(3)
    delta = torch.randn(96, 400, generator=g)
    base = torch.zeros_like(delta)
    n = delta.numel()
    common = dict(weight=1.0, normalize=False, density=density, epsilon=epsilon)

    out = _merge(method, base, [delta], seed=9, rescale=False, **common)
    kept = out != 0
    assert torch.equal(out[kept], delta[kept])
    # Mean keep probability is density ...
    probs = _della_expected_probs(delta, density, epsilon)
    assert probs.mean().item() == pytest.approx(density, abs=1e-9)
    assert abs(kept.float().mean().item() - density) < _binomial_tol(density, n)
    # ... and it grows with magnitude: check it in rank bands (each band
    # holds 1/8 of every row), against the expected probability of the band.
    order = delta.abs().argsort(dim=1).argsort(dim=1)
    width = delta.shape[1]
    bands = 8
    observed = []
    for b in range(bands):
        band = (order >= b * width // bands) & (order < (b + 1) * width // bands)
        want = probs[band].mean().item()
        got = kept[band].float().mean().item()
        assert abs(got - want) < _binomial_tol(want, int(band.sum())), (b, got, want)
        observed.append(got)
    assert observed[-1] - observed[0] > 2 * epsilon * 0.75 - 2 * _binomial_tol(0.5, n // bands)

    scaled = _merge(method, base, [delta], seed=9, rescale=True, **common)
    assert torch.equal(scaled != 0, kept)
    assert scaled.abs().sum().item() == pytest.approx(delta.abs().sum().item(), rel=1e-5)


@pytest.mark.parametrize("method", DELLA)
@pytest.mark.parametrize(
    "density,epsilon",
    [(0.9, 0.1), (0.95, 0.1), (0.1, 0.1), (0.05, 0.1), (0.5, 0.5), (0.5, 0.9)],
)
def test_della_density_plus_minus_epsilon_outside_unit_interval_is_refused(method, density, epsilon):
    delta = torch.randn(8, 16, generator=torch.Generator().manual_seed(0))
    with pytest.raises(EvomergeError) as e:
        _merge(method, torch.zeros_like(delta), [delta], seed=0, density=density, epsilon=epsilon)
    msg = str(e.value)
    assert "epsilon" in msg and "density" in msg and "\n" not in msg


@pytest.mark.parametrize("method", DELLA)
def test_della_epsilon_just_inside_is_accepted(method):
    delta = torch.randn(8, 16, generator=torch.Generator().manual_seed(0))
    for density, epsilon in [(0.89, 0.1), (0.11, 0.1), (0.5, 0.49), (1.0, 0.3)]:
        out = _merge(method, torch.zeros_like(delta), [delta], seed=0, density=density, epsilon=epsilon)
        assert out.shape == delta.shape and torch.isfinite(out).all()


def test_della_bad_epsilon_in_a_recipe_fails_the_merge_cleanly(llama, tmp_path):
    recipe = Recipe.from_dict(
        {
            "method": "della",
            "base_model": str(llama.base),
            "sources": [
                {"model": str(llama.ft[0]), "parameters": {"weight": 0.5, "density": 0.9, "epsilon": 0.2}},
                {"model": str(llama.base)},
            ],
        }
    )
    out = tmp_path / "out"
    with pytest.raises(EvomergeError, match="epsilon"):
        merge_to_disk(recipe, out, allow_outside=True, progress=False)
    assert not out.exists()
    assert not [p for p in tmp_path.iterdir() if ".partial-" in p.name]


# -- unbiased rescaling --------------------------------------------------------------------

N_SEEDS = 300


def _average(method: str, base, models, seeds, **params) -> torch.Tensor:
    total = torch.zeros_like(base, dtype=torch.float64)
    for s in seeds:
        total += _merge(method, base, models, seed=s, **params).double()
    return total / len(seeds)


@pytest.fixture(scope="module")
def two_task_vectors():
    g = torch.Generator().manual_seed(2024)
    base = torch.randn(96, 160, generator=g, dtype=torch.float64)
    deltas = [torch.randn(96, 160, generator=g, dtype=torch.float64) * s for s in (0.05, 0.02)]
    return base, deltas


def _z(mean: torch.Tensor, expected: torch.Tensor, var_one: torch.Tensor, n: int) -> torch.Tensor:
    """Per-entry z-scores of an average of n draws with single-draw variance var_one."""
    return (mean - expected) / (var_one / n).sqrt()


def test_dare_rescaled_average_is_task_arithmetic(two_task_vectors):
    base, deltas = two_task_vectors
    models = [base + d for d in deltas]
    weights, densities = [0.7, 0.4], [0.3, 0.6]
    common = dict(weight=weights, normalize=False)
    ta = _merge("task_arithmetic", base, models, seed=0, **common).double()
    assert torch.allclose(ta, base + 0.7 * deltas[0] + 0.4 * deltas[1], atol=1e-12)

    seeds = range(1000, 1000 + N_SEEDS)
    mean = _average("dare_linear", base, models, seeds, density=densities, rescale=True, **common)
    # One draw keeps w * d / p with probability p: variance (w d)^2 (1 - p) / p.
    var = sum((w * d) ** 2 * (1 - p) / p for w, d, p in zip(weights, deltas, densities))
    z = _z(mean, ta, var, N_SEEDS)
    n = z.numel()
    # Each entry within 6 standard errors (with 15k entries the chance of a
    # false alarm is ~3e-5), and the z-scores spread as a standard normal's.
    assert z.abs().max().item() < 6.0
    assert abs(z.mean().item()) < 6 / math.sqrt(n)
    assert 0.85 < (z**2).mean().item() < 1.15
    # Globally: the fitted slope of the averaged update on the unmasked update is 1.
    update, want = mean - base, ta - base
    slope = (update * want).sum() / (want * want).sum()
    slope_se = ((want**2 * var / N_SEEDS).sum()).sqrt() / (want * want).sum()
    assert abs(slope.item() - 1.0) < 6 * slope_se.item()
    assert slope_se.item() < 0.01  # the test has the power to see a 5% bias

    # Negative control: without rescaling the average is density x the
    # update, so the very same test rejects it by a wide margin ...
    seeds_off = range(5000, 5000 + N_SEEDS)
    mean_off = _average("dare_linear", base, models, seeds_off, density=densities, rescale=False, **common)
    z_off = _z(mean_off, ta, var, N_SEEDS)
    assert (z_off.abs() > 6).double().mean().item() > 0.25  # most entries far outside the positive test's band
    assert (z_off**2).mean().item() > 10
    slope_off = ((mean_off - base) * want).sum() / (want * want).sum()
    assert slope_off.item() < 0.7
    # ... while it matches base + sum_i p_i w_i d_i, with Bernoulli variance (w d)^2 p (1 - p).
    scaled = base + sum(p * w * d for w, d, p in zip(weights, deltas, densities))
    var_off = sum((w * d) ** 2 * p * (1 - p) for w, d, p in zip(weights, deltas, densities))
    z_scaled = _z(mean_off, scaled, var_off, N_SEEDS)
    assert z_scaled.abs().max().item() < 6.0
    assert 0.85 < (z_scaled**2).mean().item() < 1.15


def test_della_rescaled_average_is_the_ramped_task_vector(two_task_vectors):
    """DELLA keeps entry i with probability q_i (the magnitude ramp) and
    rescales the kept vector by one factor c = |d|_1 / sum_i q_i |d_i| (in
    expectation), so its average is base + sum_j w_j c_j q_j d_j; with
    rescale off it is base + sum_j w_j q_j d_j."""
    base, deltas = two_task_vectors
    models = [base + d for d in deltas]
    weights, density, epsilon = [0.7, 0.4], 0.4, 0.25
    common = dict(weight=weights, density=density, epsilon=epsilon, normalize=False)
    n_seeds = 200
    qs = [_della_expected_probs(d, density, epsilon) for d in deltas]
    cs = [d.abs().sum() / (q * d.abs()).sum() for d, q in zip(deltas, qs)]

    mean = _average("della_linear", base, models, range(n_seeds), rescale=True, **common)
    want = base + sum(w * c * q * d for w, c, q, d in zip(weights, cs, qs, deltas))
    var = sum((w * c * d) ** 2 * q * (1 - q) for w, c, q, d in zip(weights, cs, qs, deltas))
    z = _z(mean, want, var, n_seeds)
    assert z.abs().max().item() < 6.0
    assert 0.85 < (z**2).mean().item() < 1.15
    # Against plain task arithmetic the ramp shows: small entries are
    # under-weighted, large ones over-weighted, so it is not the same.
    ta = base + sum(w * d for w, d in zip(weights, deltas))
    assert (_z(mean, ta, var, n_seeds) ** 2).mean().item() > 5

    plain = _average("della_linear", base, models, range(n_seeds), rescale=False, **common)
    want_plain = base + sum(w * q * d for w, q, d in zip(weights, qs, deltas))
    var_plain = sum((w * d) ** 2 * q * (1 - q) for w, q, d in zip(weights, qs, deltas))
    z_plain = _z(plain, want_plain, var_plain, n_seeds)
    assert z_plain.abs().max().item() < 6.0
    assert 0.85 < (z_plain**2).mean().item() < 1.15
    assert (_z(plain, want, var_plain, n_seeds) ** 2).mean().item() > 10
