"""The Recipe: YAML round-trips, a stable fingerprint, mergekit configs in and
out unchanged, mergekit's setting semantics (gradients, filters), and
one-line errors that name the problem."""

import copy

import pytest
import yaml

from evomerge.engine.methods import METHODS
from evomerge.engine.recipe import Conditional, Recipe, evaluate_setting, load_recipe
from evomerge.errors import EvomergeError


def _full() -> dict:
    """An evomerge recipe touching every field and every kind of setting."""
    return {
        "method": "ties",
        "base_model": "models/base",
        "sources": [
            {
                "model": "models/a",
                "parameters": {
                    "weight": [0.2, 0.8, 0.5],
                    "density": [
                        {"filter": "self_attn", "value": [0.3, 0.9]},
                        {"filter": "mlp", "value": 0.6},
                        {"value": 0.7},
                    ],
                },
                "sha256": {"model.safetensors": "ab" * 32, "model-2.safetensors": "cd" * 32},
            },
            {"model": "models/b", "parameters": {"weight": 0.4, "density": {"filter": "*", "value": 0.5}}},
            {"model": "models/base"},
        ],
        "parameters": {"normalize": False, "int8_mask": True, "lambda": [0.9, 1.1]},
        "dtype": "bfloat16",
        "out_dtype": "float16",
        "seed": 1234,
        "tokenizer_source": "base",
        "metadata": {"score": 0.61, "generation": 3, "tags": ["x", "y"]},
    }


def _sliced() -> dict:
    return {
        "method": "slerp",
        "base_model": "models/a",
        "slices": [
            {
                "sources": [
                    {"model": "models/a", "layer_range": [0, 2]},
                    {"model": "models/b", "layer_range": [0, 2]},
                ],
                "parameters": {"t": [{"filter": "self_attn", "value": [0.0, 1.0]}, {"value": 0.5}]},
            },
            {
                "sources": [
                    {"model": "models/a", "layer_range": [2, 4]},
                    {"model": "models/b", "layer_range": [2, 4]},
                ],
                "base_model": "models/b",
                "parameters": {"t": 0.25},
            },
        ],
        "sources": [{"model": "models/a", "sha256": {"model.safetensors": "ef" * 32}}],
        "dtype": "float32",
        "seed": 5,
    }


def _reversed(value):
    """The same data with every mapping's keys in reverse order."""
    if isinstance(value, dict):
        return {k: _reversed(value[k]) for k in reversed(list(value))}
    if isinstance(value, list):
        return [_reversed(v) for v in value]
    return value


# -- YAML round trip -------------------------------------------------------------


@pytest.mark.parametrize("make", [_full, _sliced])
def test_yaml_round_trip(make):
    r = Recipe.from_dict(make())
    text = r.to_yaml()
    back = Recipe.from_dict(yaml.safe_load(text))
    assert back == r
    assert back.fingerprint() == r.fingerprint()
    assert back.to_yaml() == text
    # Nothing was lost on the way: the dumped data is the input data.
    assert yaml.safe_load(text) == yaml.safe_load(yaml.safe_dump(make()))


def test_yaml_round_trip_keeps_types_of_settings():
    r = Recipe.from_dict(yaml.safe_load(Recipe.from_dict(_full()).to_yaml()))
    a = r.sources[0].parameters
    assert a["weight"] == [0.2, 0.8, 0.5]
    assert isinstance(a["density"], list) and all(isinstance(c, Conditional) for c in a["density"])
    assert [c.filter for c in a["density"]] == ["self_attn", "mlp", None]
    assert isinstance(r.sources[1].parameters["density"], Conditional)
    assert r.parameters["normalize"] is False and r.parameters["int8_mask"] is True
    assert r.seed == 1234 and r.metadata["generation"] == 3
    s = Recipe.from_dict(yaml.safe_load(Recipe.from_dict(_sliced()).to_yaml()))
    assert s.slices[1].sources[0].layer_range == (2, 4)
    assert s.slices[1].base_model == "models/b"


# -- fingerprint -------------------------------------------------------------------


@pytest.mark.parametrize("make", [_full, _sliced])
def test_fingerprint_ignores_key_order(make):
    a, b = Recipe.from_dict(make()), Recipe.from_dict(_reversed(make()))
    assert list(b.parameters or b.slices[0].parameters) != [] and a == b
    assert a.fingerprint() == b.fingerprint()
    assert len(a.fingerprint()) == 64 and int(a.fingerprint(), 16) >= 0


def test_fingerprint_ignores_metadata():
    a = Recipe.from_dict(_full())
    data = _full()
    data["metadata"] = {"score": 0.99, "note": "evaluated again"}
    b = Recipe.from_dict(data)
    data.pop("metadata")
    c = Recipe.from_dict(data)
    assert a != b  # metadata is part of the recipe ...
    assert a.fingerprint() == b.fingerprint() == c.fingerprint()  # ... but not of its fingerprint


def _edits():
    """(name, edit of _full()) pairs: each changes exactly one thing."""

    def src(i, key, value):
        def edit(d):
            d["sources"][i]["parameters"][key] = value

        return edit

    def cond(j, key, value):
        def edit(d):
            d["sources"][0]["parameters"]["density"][j][key] = value

        return edit

    def top(key, value):
        def edit(d):
            d[key] = value

        return edit

    def shared(key, value):
        def edit(d):
            d["parameters"][key] = value

        return edit

    return [
        ("scalar weight", src(1, "weight", 0.41)),
        ("gradient entry", src(0, "weight", [0.2, 0.8, 0.51])),
        ("gradient length", src(0, "weight", [0.2, 0.8])),
        ("filtered value", cond(1, "value", 0.61)),
        ("filter text", cond(0, "filter", "mlp.up")),
        ("shared bool", shared("normalize", True)),
        ("shared gradient", shared("lambda", [0.9, 1.2])),
        ("method", top("method", "dare_ties")),
        ("seed", top("seed", 1235)),
        ("dtype", top("dtype", "float32")),
        ("out_dtype", top("out_dtype", "bfloat16")),
        ("base_model", top("base_model", "models/b")),
        ("tokenizer_source", top("tokenizer_source", "models/a")),
        ("sha256 pin", lambda d: d["sources"][0]["sha256"].update({"model.safetensors": "ac" * 32})),
        ("model order", lambda d: d["sources"].reverse()),
        ("added parameter", shared("rescale", True)),
    ]


@pytest.mark.parametrize("name,edit", _edits(), ids=[n for n, _ in _edits()])
def test_fingerprint_changes_with_any_parameter(name, edit):
    data = _full()
    edit(data)
    assert data != _full()
    assert Recipe.from_dict(data).fingerprint() != Recipe.from_dict(_full()).fingerprint()


def test_fingerprint_changes_with_layer_range():
    data = _sliced()
    data["slices"][1]["sources"][1]["layer_range"] = [1, 3]
    assert Recipe.from_dict(data).fingerprint() != Recipe.from_dict(_sliced()).fingerprint()


# Regression: the fingerprint hashed the raw values, so weight 1 and weight 1.0
# (equal recipes) got different fingerprints.
def test_equal_recipes_with_int_and_float_values_share_a_fingerprint():
    a = Recipe.from_dict({"method": "linear", "sources": [{"model": "a", "parameters": {"weight": 1}}]})
    b = Recipe.from_dict({"method": "linear", "sources": [{"model": "a", "parameters": {"weight": 1.0}}]})
    assert a == b
    assert a.fingerprint() == b.fingerprint()


# -- mergekit configs ----------------------------------------------------------------

MERGEKIT_MODELS = """\
models:
  - model: org/base-7b
  - model: org/math-7b
    parameters:
      density: [1, 0.7, 0.1]
      weight:
        - filter: mlp
          value: 0.5
        - filter: self_attn
          value: [0.0, 0.3, 1.0]
        - value: 0.2
  - model: org/code-7b
    parameters:
      density: 0.5
      weight: 0.3
merge_method: ties
base_model: org/base-7b
parameters:
  normalize: true
  int8_mask: true
dtype: bfloat16
"""

MERGEKIT_SLICES = """\
slices:
  - sources:
      - model: org/a-7b
        layer_range: [0, 24]
  - sources:
      - model: org/b-7b
        layer_range: [8, 32]
merge_method: passthrough
dtype: float16
"""

MERGEKIT_SLERP = """\
slices:
  - sources:
      - model: org/a-7b
        layer_range: [0, 32]
      - model: org/b-7b
        layer_range: [0, 32]
merge_method: slerp
base_model: org/a-7b
parameters:
  t:
    - filter: self_attn
      value: [0, 0.5, 0.3, 0.7, 1]
    - filter: mlp
      value: [1, 0.5, 0.7, 0.3, 0]
    - value: 0.5
dtype: bfloat16
out_dtype: float16
tokenizer_source: base
"""


_CONFIGS = {"models": MERGEKIT_MODELS, "slices": MERGEKIT_SLICES, "slerp": MERGEKIT_SLERP}


@pytest.mark.parametrize("kind", list(_CONFIGS))
def test_mergekit_config_loads_unchanged(tmp_path, kind):
    text = _CONFIGS[kind]
    path = tmp_path / "mergekit.yml"
    path.write_text(text)
    r = load_recipe(path)
    data = yaml.safe_load(text)
    assert r.method == data["merge_method"]
    assert r.base_model == data.get("base_model")
    assert r.dtype == data["dtype"] and r.out_dtype == data.get("out_dtype")
    assert r.tokenizer_source == data.get("tokenizer_source")
    assert r.seed == 0 and r.metadata == {}
    if "models" in data:
        assert r.slices is None
        assert [s.model for s in r.sources] == [m["model"] for m in data["models"]]
        got = [s.model_dump(mode="json", exclude_none=True) for s in r.sources]
        assert got == data["models"]
    else:
        assert r.sources == []
        got = [sl.model_dump(mode="json", exclude_none=True) for sl in r.slices]
        assert got == data["slices"]
    dumped = r.model_dump(mode="json", exclude_none=True)
    assert dumped.get("parameters") == data.get("parameters")


@pytest.mark.parametrize(
    "kind",
    ["models", "slices", "slerp"],
)
def test_mergekit_config_written_back_unchanged(tmp_path, kind):
    from mergekit.config import MergeConfiguration

    text = _CONFIGS[kind]
    path = tmp_path / "mergekit.yml"
    path.write_text(text)
    out = load_recipe(path).to_mergekit_yaml()
    assert yaml.safe_load(out) == yaml.safe_load(text)
    MergeConfiguration.model_validate(yaml.safe_load(out))


# Regression: to_mergekit_yaml passed the Conditional objects of top-level
# 'parameters' to yaml.safe_dump, which raised RepresenterError.
def test_to_mergekit_yaml_with_top_level_filters():
    from mergekit.config import MergeConfiguration

    r = Recipe.from_dict(_simple(parameters={"normalize": [{"filter": "mlp", "value": False}, {"value": True}]}))
    data = yaml.safe_load(r.to_mergekit_yaml())
    assert data["parameters"]["normalize"] == [{"filter": "mlp", "value": False}, {"value": True}]
    MergeConfiguration.model_validate(data)


def test_mergekit_settings_keep_their_structure(tmp_path):
    path = tmp_path / "mergekit.yml"
    path.write_text(MERGEKIT_MODELS)
    r = load_recipe(path)
    math = r.sources[1].parameters
    assert math["density"] == [1, 0.7, 0.1]
    assert [(c.filter, c.value) for c in math["weight"]] == [
        ("mlp", 0.5),
        ("self_attn", [0.0, 0.3, 1.0]),
        (None, 0.2),
    ]
    assert r.parameters == {"normalize": True, "int8_mask": True}
    assert r.sources[0].parameters is None


@pytest.mark.parametrize("make", [_full, _sliced])
def test_to_mergekit_yaml_is_valid_for_mergekit(make):
    from mergekit.config import MergeConfiguration

    r = Recipe.from_dict(make())
    data = yaml.safe_load(r.to_mergekit_yaml())
    cfg = MergeConfiguration.model_validate(data)
    assert cfg.merge_method == r.method
    assert cfg.base_model is not None and str(cfg.base_model.model.path) == r.base_model
    assert cfg.dtype == r.dtype
    assert "merge_method" in data and "method" not in data
    assert "seed" not in data and "metadata" not in data and "sha256" not in r.to_mergekit_yaml()
    if r.slices:
        assert cfg.models is None and len(cfg.slices) == len(r.slices)
        assert [tuple(s.layer_range) for s in cfg.slices[0].sources] == [s.layer_range for s in r.slices[0].sources]
    else:
        assert cfg.slices is None and [str(m.model.model.path) for m in cfg.models] == [s.model for s in r.sources]
    # Reading mergekit's YAML back gives the same merge (seed, pins, metadata aside).
    back = Recipe.from_dict(data)
    plain = r.model_copy(
        update={"seed": 0, "metadata": {}, "sources": [s.model_copy(update={"sha256": None}) for s in r.sources]}
    )
    if r.slices:
        plain = plain.model_copy(update={"sources": []})
    assert back == plain


def test_mergekit_options_evomerge_lacks_are_refused(tmp_path):
    data = yaml.safe_load(MERGEKIT_MODELS)
    data["chat_template"] = "chatml"
    with pytest.raises(EvomergeError, match="chat_template"):
        Recipe.from_dict(data)


# -- evaluate_setting -----------------------------------------------------------------

_float = METHODS["ties"].param("weight").validate
_bool = METHODS["ties"].param("normalize").validate


@pytest.mark.parametrize(
    "gradient,t,want",
    [
        ([0.0, 1.0], 0.0, 0.0),
        ([0.0, 1.0], 0.5, 0.5),
        ([0.0, 1.0], 1.0, 1.0),
        ([0.2, 0.6], 0.25, 0.3),
        ([0.0, 1.0, 0.5], 0.0, 0.0),
        ([0.0, 1.0, 0.5], 0.25, 0.5),
        ([0.0, 1.0, 0.5], 0.5, 1.0),
        ([0.0, 1.0, 0.5], 0.75, 0.75),
        ([0.0, 1.0, 0.5], 1.0, 0.5),
        ([0.4], 0.7, 0.4),
        (0.3, 0.9, 0.3),
        ("0.25", 0.0, 0.25),
    ],
)
def test_gradients_interpolate_linearly(gradient, t, want):
    got = evaluate_setting(gradient, "model.layers.0.mlp.up_proj.weight", t, _float)
    assert isinstance(got, float)
    assert got == pytest.approx(want, abs=1e-12)


def test_filters_first_match_wins_and_fall_through_gives_none():
    setting = [
        Conditional(filter="self_attn", value=0.1),
        Conditional(filter="attn", value=0.2),
        Conditional(filter="mlp", value=[0.0, 1.0]),
    ]
    q = "model.layers.3.self_attn.q_proj.weight"
    assert evaluate_setting(setting, q, 0.0, _float) == 0.1  # 'attn' also matches, but comes later
    assert evaluate_setting(setting[1:], q, 0.0, _float) == 0.2
    assert evaluate_setting(setting, "model.layers.3.mlp.up_proj.weight", 0.5, _float) == pytest.approx(0.5)
    # No filter matches: None, so that a lower-precedence setting applies.
    assert evaluate_setting(setting, "model.norm.weight", 0.0, _float) is None
    assert evaluate_setting(Conditional(filter="mlp", value=0.3), "lm_head.weight", 0.0, _float) is None
    # A catch-all (no filter, or '*') after them takes the rest.
    for catch_all in (Conditional(value=0.9), Conditional(filter="*", value=0.9)):
        assert evaluate_setting(setting + [catch_all], "model.norm.weight", 0.0, _float) == 0.9
        assert evaluate_setting(setting + [catch_all], q, 0.0, _float) == 0.1
    # A catch-all first shadows everything after it.
    assert evaluate_setting([Conditional(value=0.7)] + setting, q, 0.0, _float) == 0.7


@pytest.mark.parametrize(
    "gradient,t,want",
    [
        ([True, False], 0.0, True),
        ([True, False], 0.5, True),
        ([True, False], 0.99, True),
        ([True, False], 1.0, False),
        ([False, True, False], 0.5, True),
        ([False, True, False], 0.49, False),
        ([False, True, False], 1.0, False),
    ],
)
def test_bool_gradient_picks_a_step(gradient, t, want):
    got = evaluate_setting(gradient, "model.layers.0.mlp.up_proj.weight", t, _bool)
    assert got is want


def test_evaluate_setting_matches_mergekit():
    from mergekit.config import ConditionalParameter
    from mergekit.config import evaluate_setting as mk_evaluate

    def to_mk(setting):
        if isinstance(setting, Conditional):
            return ConditionalParameter(value=setting.value, filter=setting.filter)
        if isinstance(setting, list) and setting and isinstance(setting[0], Conditional):
            return [to_mk(c) for c in setting]
        return setting

    settings = [
        (0.4, _float),
        ([0.1, 0.9], _float),
        ([0.0, 0.3, 1.0, 0.2], _float),
        ([True, False, True], _bool),
        (Conditional(filter="mlp", value=[0.2, 0.4]), _float),
        ([Conditional(filter="self_attn", value=[1.0, 0.0]), Conditional(filter="attn", value=0.3)], _float),
        ([Conditional(filter="norm", value=0.1), Conditional(filter="*", value=[0.5, 0.6, 0.9])], _float),
    ]
    names = ["model.layers.1.self_attn.k_proj.weight", "model.layers.1.mlp.down_proj.weight", "model.norm.weight"]
    for setting, validate in settings:
        for name in names:
            for k in range(11):
                t = k / 10
                ours = evaluate_setting(setting, name, t, validate)
                theirs = mk_evaluate(name, to_mk(setting), t, validate=validate)
                assert ours == theirs, (setting, name, t)


# -- errors ------------------------------------------------------------------------------


def _simple(**over) -> dict:
    data = {
        "method": "ties",
        "base_model": "b",
        "sources": [{"model": "a", "parameters": {"weight": 0.5, "density": 0.5}}, {"model": "b"}],
    }
    data.update(over)
    return data


def test_unknown_method_is_named():
    with pytest.raises(EvomergeError) as e:
        Recipe.from_dict(_simple(method="frankenmerge"))
    msg = str(e.value)
    assert "frankenmerge" in msg and "unknown merge method" in msg
    assert "ties" in msg and "slerp" in msg  # the fix: the methods that exist
    assert "\n" not in msg


def test_unknown_method_in_mergekit_yaml_is_named(tmp_path):
    path = tmp_path / "m.yml"
    path.write_text(MERGEKIT_MODELS.replace("merge_method: ties", "merge_method: tiez"))
    with pytest.raises(EvomergeError, match="unknown merge method 'tiez'"):
        load_recipe(path)


@pytest.mark.parametrize(
    "where",
    ["recipe", "model", "slice", "slice model"],
)
def test_unknown_parameter_is_named(where):
    if where == "recipe":
        data = _simple(parameters={"denisty": 0.5})
    elif where == "model":
        data = _simple()
        data["sources"][0]["parameters"]["denisty"] = 0.5
    else:
        data = {
            "method": "passthrough",
            "slices": [{"sources": [{"model": "a", "layer_range": [0, 2]}]}],
        }
        if where == "slice":
            data["slices"][0]["parameters"] = {"denisty": 0.5}
        else:
            data["slices"][0]["sources"][0]["parameters"] = {"denisty": 0.5}
    with pytest.raises(EvomergeError) as e:
        Recipe.from_dict(data)
    msg = str(e.value)
    assert "unknown parameter 'denisty'" in msg
    assert "density" in msg or "scale" in msg  # the parameters the method does take
    assert "\n" not in msg


@pytest.mark.parametrize("bad", [0, 0.0, 1.5, -0.2, [0.5, 0.0], [0.5, 1.5], {"filter": "mlp", "value": 0}])
def test_density_outside_its_range_is_refused(bad):
    data = _simple()
    data["sources"][0]["parameters"]["density"] = bad
    with pytest.raises(EvomergeError) as e:
        Recipe.from_dict(data)
    msg = str(e.value)
    assert "'density'" in msg and "outside (0.0, 1.0]" in msg
    assert "\n" not in msg


def test_density_at_its_limits_and_inside_is_accepted():
    for good in (1, 1.0, 0.01, [1.0, 0.2], {"filter": "mlp", "value": 1}):
        data = _simple()
        data["sources"][0]["parameters"]["density"] = good
        assert Recipe.from_dict(data).sources[0].parameters["density"] is not None


def test_density_errors_from_mergekit_yaml(tmp_path):
    for bad in ("0", "1.5"):
        path = tmp_path / f"d{bad}.yml"
        path.write_text(MERGEKIT_MODELS.replace("density: 0.5", f"density: {bad}"))
        with pytest.raises(EvomergeError, match=r"'density'.*outside"):
            load_recipe(path)


def test_other_user_errors_are_evomerge_errors():
    cases = [
        (_simple(dtype="float8"), "float8"),
        (_simple(sources=[]), "no models"),
        (_simple(surprise=1), "surprise"),
        ({**_simple(), "parameters": {"normalize": "yes"}}, "normalize"),
        ({**_simple(), "parameters": {"lambda": "lots"}}, "lambda"),
    ]
    for data, word in cases:
        with pytest.raises(EvomergeError, match=word):
            Recipe.from_dict(copy.deepcopy(data))
