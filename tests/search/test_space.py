"""SearchSpace: points <-> recipes, names and bounds from the method declarations."""

import dataclasses
import random
from pathlib import Path

import pytest

from evomerge.engine.methods import METHODS
from evomerge.engine.recipe import Conditional
from evomerge.errors import EvomergeError
from evomerge.search.space import SearchSpace, load_space_spec, preset_names

TENSORS = ["model.layers.0.self_attn.q_proj.weight", "model.layers.0.mlp.up_proj.weight", "lm_head.weight"]


def space(spec, models=("m/a", "m/b"), base="m/base", layers=6):
    spec, where = load_space_spec(spec, Path("."))
    return SearchSpace(spec, models=list(models), base=base, num_layers=layers, tensor_names=TENSORS, where=where)


def test_presets_exist_and_round_trip():
    assert {"ties_dare_layerwise", "task_arithmetic_layerwise", "slerp_gradient", "linear_soup"} <= set(preset_names())
    rng = random.Random(0)
    for name in preset_names():
        s = space(name)
        for _ in range(5):
            x = [rng.random() for _ in range(s.dim)]
            recipe = s.decode(x)
            params = s.encode(recipe)
            assert params is not None, name
            assert s.decode_params(params).fingerprint() == recipe.fingerprint()
            back = s.params_to_unit(params)
            if s.spec.routing is not None:
                # route slots are bins, not points: the recipe round-trips, not x
                assert s.decode(back).fingerprint() == recipe.fingerprint()
            else:
                # a method choice is a bin (re-encoded at its centre), and the
                # other methods' coordinates are ignored: compare the method's own
                own = [(a, b) for g, a, b in zip(s.genes, back, x) if g.method == recipe.method]
                assert own and max(abs(a - b) for a, b in own) < 1e-5


def test_names_and_bounds_come_from_the_method_declarations():
    s = space({"methods": ["dare_ties"], "search": {"weight": {"per": "layer"}, "density": None}})
    declared = {p.name: p.bounds for p in METHODS["dare_ties"].params}
    for g in s.genes:
        assert (g.low, g.high) == declared[g.param]
    # 6 layers x 2 models of weight, 1 global density x 2 models
    assert s.dim == 6 * 2 + 2
    assert {g.name for g in s.genes} >= {"weight/a/L0", "weight/b/L5", "density/a"}


def test_narrowed_bounds_map_the_unit_cube():
    s = space({"methods": ["ties"], "search": {"weight": None, "density": {"bounds": [0.4, 0.6]}}})
    r = s.decode([0.0, 1.0, 0.0, 1.0])
    by = {src.model: src.parameters for src in r.sources}
    assert by["m/a"]["weight"] == 0.0 and by["m/b"]["weight"] == 1.0
    assert by["m/a"]["density"] == 0.4 and by["m/b"]["density"] == 0.6


@pytest.mark.parametrize(
    "bounds, fragment", [([0.5, 0.5], "empty or reversed"), ([0.8, 0.2], "empty or reversed"), ([0, 2], "only narrow")]
)
def test_bad_bounds_are_refused(bounds, fragment):
    with pytest.raises(EvomergeError, match=fragment):
        space({"methods": ["ties"], "search": {"weight": {"bounds": bounds}, "density": None}})


def test_blocks_expand_to_per_layer_values():
    s = space({"methods": ["task_arithmetic"], "search": {"weight": {"per": "block", "block": 4}}})
    assert s.dim == 2 * 2  # ceil(6 / 4) blocks x 2 models
    r = s.decode([0.1, 0.9, 0.3, 0.7])
    w = r.sources[1].parameters["weight"]
    assert w == [0.1] * 4 + [0.9] * 2


def test_groups_become_filters_with_a_rest_group():
    s = space({"methods": ["task_arithmetic"], "search": {"weight": {"groups": ["self_attn", "mlp"]}}})
    r = s.decode([0.2, 0.4, 0.6, 0.8, 1.0, 0.0])
    w = r.sources[1].parameters["weight"]
    assert w == [
        Conditional(filter="self_attn", value=0.2),
        Conditional(filter="mlp", value=0.4),
        Conditional(value=0.6),
    ]
    with pytest.raises(EvomergeError, match="matches no tensor"):
        space({"methods": ["task_arithmetic"], "search": {"weight": {"groups": ["cross_attn"]}}})


def test_a_categorical_method_choice_uses_only_that_methods_genes():
    s = space({"methods": ["linear", "ties"], "search": {"weight": None, "density": None}})
    assert s.genes[0].name == "method"
    assert {g.name for g in s.active("linear")} == {"method", "linear.weight/a", "linear.weight/b"}
    lin = s.decode([0.1] + [0.5] * (s.dim - 1))
    ties = s.decode([0.9] + [0.5] * (s.dim - 1))
    assert lin.method == "linear" and ties.method == "ties"
    assert lin.base_model is None and all("density" not in src.parameters for src in lin.sources)
    assert ties.base_model == "m/base"
    assert ties.sources[1].parameters["density"] == pytest.approx(0.55)
    assert s.encode(lin) == {"method": "linear", "linear.weight/a": 0.5, "linear.weight/b": 0.5}


def test_encode_refuses_what_the_space_cannot_express():
    s = space("task_arithmetic_layerwise")
    other = space("ties_dare_layerwise").decode([0.5] * space("ties_dare_layerwise").dim)
    assert s.encode(other) is None
    # a scalar weight is expressible per layer; a 3-point gradient is not
    flat = s.decode([0.25] * s.dim)
    assert s.encode(flat) is not None
    grad = flat.model_copy(
        update={
            "sources": [
                flat.sources[0],
                flat.sources[1].model_copy(update={"parameters": {"weight": [0.1, 0.5, 0.9]}}),
                flat.sources[2],
            ]
        }
    )
    assert s.encode(grad) is None


def test_encode_says_why_a_recipe_is_outside_the_space():
    s = space("task_arithmetic_layerwise")
    own = s.decode([0.3] * s.dim)
    assert s.try_encode(own) == (s.encode(own), None) and s.why_not(own) is None
    other = space("ties_dare_layerwise").decode([0.5] * space("ties_dare_layerwise").dim)
    assert s.encode(other) is None
    assert s.why_not(other) == "its method 'dare_ties' is not one this space searches (task_arithmetic)"
    stranger = own.model_copy(
        update={"sources": [*own.sources[:2], own.sources[2].model_copy(update={"model": "m/c"})]}
    )
    assert s.try_encode(stranger) == (None, "it does not merge m/b, which this space does")
    assert "differing at dtype" in s.why_not(own.model_copy(update={"dtype": "float16"}))
    routes = space("dfs_paper")
    assert routes.why_not(own) == "it has no route, and this space searches routing"


def test_the_pair_rule_follows_the_declaration_not_the_name(monkeypatch):
    # slerp's inputs (its base is one of the pair) come from base_is_endpoint
    monkeypatch.setitem(METHODS, "pair", dataclasses.replace(METHODS["slerp"], name="pair"))
    one = space({"methods": ["pair"], "search": {"t": None}}, models=("m/a",)).decode([0.25])
    assert [src.model for src in one.sources] == ["m/base", "m/a"] and one.base_model == "m/base"
    two = space({"methods": ["pair"], "search": {"t": None}}).decode([0.25])
    assert [src.model for src in two.sources] == ["m/a", "m/b"] and two.base_model == "m/a"
    with pytest.raises(EvomergeError, match="pair merges exactly two models"):
        space({"methods": ["pair"], "search": {"t": None}}, models=("m/a", "m/b", "m/c"))


@pytest.mark.parametrize(
    "spec, kw, fragment",
    [
        ({"methods": ["ties"], "search": {"weight": None, "density": None}}, {"base": None}, "needs a base"),
        ({"methods": ["slerp"], "search": {"t": None}}, {"models": ("a", "b", "c")}, "exactly two"),
        ({"methods": ["ties"], "search": {"weigth": None}}, {}, "no method"),
        ({"methods": ["ties"], "search": {"density": None}}, {}, "needs 'weight'"),
        (
            {"methods": ["ties"], "search": {"weight": {"per": "block", "block": 9}}, "fixed": {"density": 0.5}},
            {},
            "exceeds",
        ),
        (
            {"methods": ["ties"], "search": {"normalize": None, "weight": None}, "fixed": {"density": 0.5}},
            {},
            "not a searchable",
        ),
        ({"methods": ["ties"], "search": {"weight": None}, "fixed": {"density": 1.5}}, {}, "outside"),
        ({"methods": ["nope"], "search": {}}, {}, "unknown merge method"),
    ],
)
def test_a_space_that_does_not_fit_is_refused(spec, kw, fragment):
    with pytest.raises(EvomergeError, match=fragment):
        space(spec, **kw)


def test_unknown_preset_names_the_presets():
    with pytest.raises(EvomergeError, match="ties_dare_layerwise"):
        space("no_such_space")


def test_fingerprint_changes_with_what_decides_recipes():
    a = space("task_arithmetic_layerwise")
    assert a.fingerprint() == space("task_arithmetic_layerwise").fingerprint()
    assert a.fingerprint() != space("task_arithmetic_layerwise", layers=8).fingerprint()
    assert (
        a.fingerprint()
        != space(
            {"methods": ["task_arithmetic"], "search": {"weight": {"per": "layer", "bounds": [0, 0.5]}}}
        ).fingerprint()
    )
