"""The merge method as a searched dimension: a space listing several methods,
each method's own parameters used only when it is chosen (conditional
parameters for Optuna, one binned coordinate for pycma)."""

import random
from pathlib import Path

import optuna
import pytest
import torch
import yaml
from helpers import driver_settings, trials, write_config

from evomerge.app.cli import main
from evomerge.engine.merge import InPlaceMerger
from evomerge.engine.recipe import Recipe
from evomerge.errors import EvomergeError
from evomerge.search.space import DIGITS, METHOD_GENE, SearchSpace, load_space_spec

TENSORS = ["model.layers.0.self_attn.q_proj.weight", "model.layers.0.mlp.up_proj.weight", "lm_head.weight"]

# Families whose parameters differ: per-model weights and densities (ties),
# a shared select_topk (sce), a shared t on a pair (nearswap), per-model
# weights with an optional base (multislerp), nothing to search (karcher).
MIXED = {
    "methods": ["ties", "sce", "nearswap", "multislerp", "karcher"],
    "search": {"weight": None, "density": {"per": "block", "block": 2}, "select_topk": None, "t": None},
}
SPARSE = {
    "methods": ["ties", "dare_ties", "della", "sce"],
    "search": {"weight": None, "density": None, "epsilon": None, "select_topk": {"per": "layer"}},
    "fixed": {"lambda": 1.0},
}


def space(spec, models=("m/a", "m/b"), base="m/base", layers=6, tensors=TENSORS):
    spec, where = load_space_spec(spec, Path("."))
    return SearchSpace(spec, models=list(models), base=base, num_layers=layers, tensor_names=tensors, where=where)


def bin_centre(s: SearchSpace, method: str) -> float:
    names = s.spec.methods
    return (names.index(method) + 0.5) / len(names)


def own_genes(s: SearchSpace, method: str) -> set[str]:
    return {g.name for g in s.genes if g.method == method}


def test_every_method_gets_only_its_own_prefixed_genes():
    s = space(MIXED)
    assert s.genes[0].name == METHOD_GENE
    assert own_genes(s, "ties") == {"ties.weight/a", "ties.weight/b"} | {
        f"ties.density/{m}/{blk}" for m in "ab" for blk in ("L0-1", "L2-3", "L4-5")
    }
    assert own_genes(s, "sce") == {"sce.select_topk"}
    assert own_genes(s, "nearswap") == {"nearswap.t"}
    assert own_genes(s, "multislerp") == {"multislerp.weight/a", "multislerp.weight/b"}
    assert own_genes(s, "karcher") == set()
    # the method gene plus every method's genes, each once
    assert s.dim == 1 + sum(len(own_genes(s, m)) for m in MIXED["methods"])
    for m in MIXED["methods"]:
        assert {g.name for g in s.active(m)} == {METHOD_GENE} | own_genes(s, m)


@pytest.mark.parametrize("spec", [MIXED, SPARSE], ids=["mixed", "sparse"])
def test_cma_coordinate_bins_pick_the_method_and_inactive_coordinates_are_ignored(spec):
    s = space(spec)
    names = spec["methods"]
    n = len(names)
    rng = random.Random(0)
    for k, method in enumerate(names):
        # anywhere inside bin k, its edges included, picks method k
        for v in (k / n, (k + 0.5) / n, (k + 1) / n - 1e-9):
            x = [v] + [rng.random() for _ in range(s.dim - 1)]
            assert s.decode(x).method == method
            assert s.unit_to_params(x)[METHOD_GENE] == method
        x = [(k + 0.5) / n] + [rng.random() for _ in range(s.dim - 1)]
        params = s.unit_to_params(x)
        recipe = s.decode(x)
        # the named values keep only the chosen method's genes
        assert set(params) == {METHOD_GENE} | own_genes(s, method)
        # moving every inactive coordinate changes nothing
        moved = [x[0]] + [rng.random() if g.method != method else v for g, v in zip(s.genes[1:], x[1:])]
        assert s.unit_to_params(moved) == params
        assert s.decode(moved).fingerprint() == recipe.fingerprint()
        # moving an active one does change the recipe (when the method has one)
        active = [i for i, g in enumerate(s.genes) if g.method == method]
        if active:
            shifted = list(x)
            shifted[active[0]] = 1.0 - x[active[0]]
            assert s.decode(shifted).fingerprint() != recipe.fingerprint()
    # outside the cube clips to the first and the last bin
    assert s.decode([-3.0] + [0.5] * (s.dim - 1)).method == names[0]
    assert s.decode([7.0] + [0.5] * (s.dim - 1)).method == names[-1]


@pytest.mark.parametrize("spec", [MIXED, SPARSE], ids=["mixed", "sparse"])
def test_decode_encode_round_trips_for_every_method(spec):
    s = space(spec)
    rng = random.Random(1)
    seen = set()
    for _ in range(60):
        x = [rng.random() for _ in range(s.dim)]
        recipe = s.decode(x)
        seen.add(recipe.method)
        params = s.encode(recipe)
        assert params is not None, s.why_not(recipe)
        assert params == s.unit_to_params(x)
        assert s.decode_params(params).fingerprint() == recipe.fingerprint()
        back = s.params_to_unit(params)
        assert s.decode(back).fingerprint() == recipe.fingerprint()
        # the method's bin centre, its own coordinates as they were, the rest at the centre
        assert back[0] == pytest.approx(bin_centre(s, recipe.method))
        # (values are rounded to DIGITS decimals in the parameter's own units)
        for g, a, b in zip(s.genes[1:], back[1:], x[1:]):
            step = 10**-DIGITS / (g.high - g.low)
            assert a == pytest.approx(b if g.method == recipe.method else 0.5, abs=step)
    assert seen == set(spec["methods"])


def test_decoded_recipes_carry_only_the_chosen_methods_parameters():
    s = space(MIXED)
    by_method = {m: s.decode([bin_centre(s, m)] + [0.25] * (s.dim - 1)) for m in MIXED["methods"]}
    ties, sce, near, ms, karcher = (by_method[m] for m in MIXED["methods"])
    assert ties.base_model == "m/base" and ties.parameters is None
    assert {src.model: set(src.parameters or {}) for src in ties.sources} == {
        "m/base": set(),
        "m/a": {"weight", "density"},
        "m/b": {"weight", "density"},
    }
    assert sce.parameters == {"select_topk": pytest.approx(0.1 + 0.25 * 0.9)}
    assert all(src.parameters is None for src in sce.sources)
    # nearswap merges a pair: the first model is its base, as for slerp
    assert [src.model for src in near.sources] == ["m/a", "m/b"] and near.base_model == "m/a"
    assert near.parameters == {"t": pytest.approx(0.25 * 0.01)}
    assert ms.parameters is None and ms.sources[1].parameters == {"weight": 0.25}
    # karcher searches nothing and takes no base: its defaults
    assert karcher.parameters is None and karcher.base_model is None
    assert [src.model for src in karcher.sources] == ["m/a", "m/b"]


def test_tpe_trials_hold_only_the_chosen_methods_parameters():
    s = space(MIXED)
    study = optuna.create_study(
        direction="maximize", sampler=optuna.samplers.TPESampler(seed=0, multivariate=True, n_startup_trials=4)
    )
    rng = random.Random(0)
    seen = set()
    for _ in range(16):
        trial = study.ask()
        recipe = s.suggest(trial)
        method = trial.params[METHOD_GENE]
        seen.add(method)
        assert recipe.method == method
        assert set(trial.params) == {METHOD_GENE} | own_genes(s, method)
        assert set(trial.distributions) == set(trial.params)
        # the trial's values are the recipe's (rounded to DIGITS decimals), and encode gives them back
        back = s.encode(recipe)
        assert back[METHOD_GENE] == method and set(back) == set(trial.params)
        assert all(back[k] == pytest.approx(v, abs=10**-DIGITS) for k, v in trial.params.items() if k != METHOD_GENE)
        study.tell(trial, rng.random())
    assert len(seen) >= 3


def test_a_name_is_searched_for_the_methods_that_can_search_it():
    # della's epsilon is a searched per-model range, ram's a shared constant
    s = space({"methods": ["della", "ram"], "search": {"weight": None, "epsilon": None}})
    assert {g.name for g in s.genes} == {
        METHOD_GENE,
        "della.weight/a",
        "della.weight/b",
        "della.epsilon/a",
        "della.epsilon/b",
    }
    ram = s.decode([0.9] + [0.3] * (s.dim - 1))
    assert ram.method == "ram" and ram.parameters is None  # its default epsilon
    della = s.decode([0.1] + [0.3] * (s.dim - 1))
    assert {src.model: src.parameters for src in della.sources[1:]}["m/a"]["epsilon"] == pytest.approx(
        0.01 + 0.3 * 0.29
    )
    # alone, ram cannot search it
    with pytest.raises(EvomergeError, match="'epsilon' of ram is not a searchable number; move it to 'fixed'"):
        space({"methods": ["ram"], "search": {"epsilon": None}})


def test_methods_with_nothing_to_search_need_one_that_has_something():
    s = space({"methods": ["ties", "karcher", "ram"], "search": {"weight": None}, "fixed": {"density": 0.5}})
    assert {s.decode([v] + [0.5] * (s.dim - 1)).method for v in (0.1, 0.5, 0.9)} == {"ties", "karcher", "ram"}
    with pytest.raises(EvomergeError, match="searches only which method to use; list under 'search' a parameter"):
        space({"methods": ["karcher", "ram"]})
    with pytest.raises(EvomergeError, match="searches nothing; list parameters under 'search'"):
        space({"methods": ["karcher"]})


def test_sparse_mix_preset_loads_and_decodes():
    s = space("sparse_mix", layers=8)
    assert s.spec.methods == ["ties", "dare_ties", "della", "sce", "multislerp"]
    rng = random.Random(2)
    for method in s.spec.methods:
        x = [bin_centre(s, method)] + [rng.random() for _ in range(s.dim - 1)]
        recipe = s.decode(x)
        assert recipe.method == method
        assert s.decode_params(s.encode(recipe)).fingerprint() == recipe.fingerprint()
        if method == "sce":
            topk = recipe.parameters["select_topk"]
            assert len(topk) == 8 and topk[0:4] == [topk[0]] * 4 and topk[4:] == [topk[4]] * 4
            assert all(src.parameters is None for src in recipe.sources)
        elif method == "multislerp":  # weights only, no density, no lambda
            weighted = [src.parameters for src in recipe.sources if src.parameters]
            assert len(weighted) == 2 and all(set(p) == {"weight"} for p in weighted)
            w = weighted[0]["weight"]
            assert len(w) == 8 and w[:4] == [w[0]] * 4 and "lambda" not in (recipe.parameters or {})
        else:
            assert recipe.parameters == {"lambda": 1.0}
            w = recipe.sources[1].parameters["weight"]
            assert len(w) == 8 and w[:4] == [w[0]] * 4


@pytest.fixture(scope="module")
def three(tmp_path_factory):
    """A tiny base and two fine-tunes, far enough apart that methods differ."""
    from evomerge.app.demo.tiny import make_finetune, make_tiny_model

    root = tmp_path_factory.mktemp("choice")
    base = make_tiny_model(root / "base", arch="llama", layers=2, hidden=32, seed=0)
    return [base, *(make_finetune(base, root / f"ft{i}", seed=i + 1, scale=0.5) for i in range(2))]


def test_every_decoded_recipe_validates_and_merges(three):
    base, a, b = (str(p) for p in three)
    spec = {
        "methods": ["ties", "dare_ties", "della", "sce", "multislerp", "nearswap", "karcher", "ram", "ramplus_tl"],
        "search": {"weight": None, "density": None, "select_topk": None, "t": {"bounds": [0.0, 0.001]}, "r": None},
    }
    s = space(spec, models=(a, b), base=base, layers=2, tensors=None)
    template = Recipe.from_dict(
        {"method": "linear", "sources": [{"model": m, "parameters": {"weight": 1.0}} for m in (base, a, b)]}
    )
    merger = InPlaceMerger(template, allow_outside=True)
    rng = random.Random(3)
    outputs = {}
    for method in spec["methods"]:
        recipe = s.decode([bin_centre(s, method)] + [rng.random() for _ in range(s.dim - 1)])
        assert recipe.method == method
        model = merger.apply(Recipe.from_dict(yaml.safe_load(recipe.to_yaml())))  # as a recipe file would
        w = model.state_dict()["model.layers.1.mlp.down_proj.weight"].clone()
        assert torch.isfinite(w).all()
        outputs[method] = w
    # each method really merged its own way
    flat = list(outputs.values())
    assert all(not torch.equal(flat[i], flat[j]) for i in range(len(flat)) for j in range(i))


@pytest.fixture(scope="module")
def experiment_choice(tmp_path_factory):
    from helpers import write_sum_tasks

    from evomerge.app.demo.tiny import make_finetune, make_tiny_model

    root = tmp_path_factory.mktemp("search")
    base = make_tiny_model(root / "models" / "base", arch="llama", layers=2, hidden=32, seed=0)
    for i, name in enumerate(["expert_a", "expert_b"]):
        make_finetune(base, root / "models" / name, seed=i + 1, scale=0.5)
    write_sum_tasks(root / "tasks", 24)
    return root


@pytest.mark.slow
@pytest.mark.parametrize("driver", ["cma", "tpe"])
def test_a_short_search_over_a_method_choice(experiment_choice, tmp_path, driver):
    spec = {
        "methods": ["ties", "sce", "multislerp", "karcher"],
        "search": {"weight": None, "density": None, "select_topk": None},
    }
    config = write_config(
        experiment_choice,
        f"{driver}.yaml",
        space=spec,
        budget={"trials": 8},
        driver=driver_settings(driver, popsize=4, startup_trials=4),
    )
    run_dir = tmp_path / "run"
    assert main(["search", str(config), "--run-dir", str(run_dir), "--no-progress"]) == 0
    search = trials(run_dir, "search")
    assert len(search) == 8
    assert all(t.user_attrs["status"] == "ok" for t in search)
    s = space(spec, models=("models/expert_a", "models/expert_b"), base="models/base", layers=2, tensors=None)
    methods = set()
    for t in search:
        recipe = Recipe.model_validate(t.user_attrs["recipe"])
        methods.add(recipe.method)
        # each trial stores the method and only that method's values
        assert t.params[METHOD_GENE] == recipe.method
        assert set(t.params) == {METHOD_GENE} | own_genes(s, recipe.method)
    assert len(methods) > 1
