"""Layer-routing and hybrid searches end to end on tiny models."""

import hashlib

import pytest
import torch
import transformers
import yaml
from helpers import driver_settings, trials, write_config

from evomerge.app.cli import main
from evomerge.app.demo.tiny import make_finetune, make_tiny_model
from evomerge.engine.recipe import load_recipe
from evomerge.engine.routing import RouteMerger, max_logit_difference


@pytest.fixture(scope="module")
def realistic(experiment):
    """Models whose hidden states have a realistic size (RMS ~0.2, not the
    0.02 of a default random init): exported routes are exact up to the
    norms' epsilon, which only a stream that small makes visible."""
    base = make_tiny_model(
        experiment / "models" / "r_base", arch="llama", layers=2, hidden=32, seed=0, initializer_range=0.2
    )
    for i, name in enumerate(["r_a", "r_b"]):
        make_finetune(base, experiment / "models" / name, seed=i + 1, scale=0.3)
    return {"base_model": "models/r_base", "models": ["models/r_a", "models/r_b"]}


def _sha(folder):
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.glob("*.safetensors"))}


@pytest.mark.slow
@pytest.mark.parametrize("driver", ["cma", "tpe", "cmaes"])
def test_routing_search_end_to_end(experiment, tmp_path, driver):
    config = write_config(
        experiment,
        f"dfs_{driver}.yaml",
        space="dfs_paper",
        driver=driver_settings(driver, popsize=4, startup_trials=2),
        budget={"trials": 8},
    )
    run_dir = tmp_path / "run"
    assert main(["search", str(config), "--run-dir", str(run_dir), "--no-progress"]) == 0
    search = trials(run_dir, "search")
    assert len(search) == 8
    routes = {
        tuple((s["model"], s["layer"], s["scale"]) for s in t.user_attrs["recipe"]["route"]["layers"]) for t in search
    }
    assert len(routes) > 1  # the driver proposed different routes
    # 2 experts x 2 layers x 3 repeats = 12 slots; every route is within [1, 12]
    assert all(1 <= len(r) <= 12 for r in routes)
    assert any(len(r) != 2 for r in routes)  # not only source-shaped routes
    baselines = {t.user_attrs["name"] for t in trials(run_dir, "baseline")}
    # sources as identity routes, and the default merges (routed over `merge`)
    assert {"source base", "source expert_a", "source expert_b", "ties (density 0.5)"} <= baselines
    assert all(t.user_attrs["status"] == "ok" for t in search)


@pytest.mark.slow
def test_routing_export_rebuilds_the_scored_model(experiment, realistic, tmp_path):
    config = write_config(experiment, "dfs_export.yaml", space="dfs_paper", budget={"trials": 6}, **realistic)
    run_dir = tmp_path / "run"
    assert main(["search", str(config), "--run-dir", str(run_dir), "--no-progress"]) == 0
    # export the best search trial (not a baseline) as evomerge and mergekit
    best = max(
        (t for t in trials(run_dir, "search") if len(t.user_attrs["recipe"]["route"]["layers"]) != 2),
        key=lambda t: t.user_attrs["fitness"],
    )
    out = tmp_path / "best.yaml"
    model_dir = tmp_path / "model"
    assert (
        main(["export", str(run_dir), "--trial", str(best.number), "--out", str(out), "--merge", str(model_dir)]) == 0
    )
    recipe = load_recipe(out)
    assert recipe.route is not None and recipe.metadata["evomerge"]["trial"] == best.number
    config_json = yaml.safe_load((model_dir / "config.json").read_text())
    assert config_json["num_hidden_layers"] == len(recipe.route.layers)
    # the plain model loads without remote code and equals the routed model
    plain = transformers.AutoModelForCausalLM.from_pretrained(model_dir, trust_remote_code=False)
    routed = RouteMerger(recipe, root=out.parent, allow_outside=True).apply(recipe)
    assert max_logit_difference(routed, plain, plain.config.vocab_size) <= 1e-4
    # re-merging the exported recipe gives the same bytes
    again = tmp_path / "again"
    assert main(["merge", str(out), str(again), "--no-progress", "--allow-outside-paths"]) == 0
    assert _sha(again) == _sha(model_dir)
    # and the mergekit form is a passthrough config
    mk = tmp_path / "best_mergekit.yaml"
    assert main(["export", str(run_dir), "--trial", str(best.number), "--out", str(mk), "--format", "mergekit"]) == 0
    data = yaml.safe_load(mk.read_text())
    assert data["merge_method"] == "passthrough"
    assert sum(s["sources"][0]["layer_range"][1] - s["sources"][0]["layer_range"][0] for s in data["slices"]) == len(
        recipe.route.layers
    )


@pytest.mark.slow
def test_hybrid_search_joint_and_on_a_fixed_merge(experiment, realistic, tmp_path):
    # joint: TIES parameters and the route in one space
    config = write_config(experiment, "hybrid.yaml", space="hybrid_ties_dfs", budget={"trials": 6})
    run_dir = tmp_path / "joint"
    assert main(["search", str(config), "--run-dir", str(run_dir), "--no-progress"]) == 0
    search = trials(run_dir, "search")
    assert len(search) == 6 and all(t.user_attrs["status"] == "ok" for t in search)
    recipes = [t.user_attrs["recipe"] for t in search]
    assert all(r["method"] == "ties" and r["route"] for r in recipes)
    assert any(s["model"] == "merge" for r in recipes for s in r["route"]["layers"])

    # sequential: a parameter-space run's exported best is the routing source `merge`
    first = write_config(experiment, "param.yaml", budget={"trials": 4}, **realistic)
    assert main(["search", str(first), "--run-dir", str(tmp_path / "param"), "--no-progress"]) == 0
    best = tmp_path / "param" / "best_recipe.yaml"
    assert main(["export", str(tmp_path / "param"), "--out", str(best)]) == 0
    inside = experiment / "exports" / "param_best.yaml"
    inside.parent.mkdir(exist_ok=True)
    data = yaml.safe_load(best.read_text())
    # paths in an exported recipe are relative to it (or absolute)
    inside.write_text(yaml.safe_dump(data))
    config = write_config(
        experiment,
        "on_fixed.yaml",
        space="dfs_paper",
        merge="exports/param_best.yaml",
        budget={"trials": 5},
        **realistic,
    )
    run_dir = tmp_path / "seq"
    assert main(["search", str(config), "--run-dir", str(run_dir), "--no-progress", "--allow-outside-paths"]) == 0
    names = {t.user_attrs["name"] for t in trials(run_dir, "baseline")}
    assert "the fixed merge" in names
    out = tmp_path / "hybrid.yaml"
    best_search = max(trials(run_dir, "search"), key=lambda t: t.user_attrs["fitness"])
    assert main(["export", str(run_dir), "--trial", str(best_search.number), "--out", str(out)]) == 0
    recipe = load_recipe(out)
    # one file: the merge, then the route
    assert recipe.method == load_recipe(inside).method and recipe.route is not None
    model_dir = tmp_path / "hybrid_model"
    assert main(["merge", str(out), str(model_dir), "--no-progress", "--allow-outside-paths"]) == 0
    plain = transformers.AutoModelForCausalLM.from_pretrained(model_dir)
    routed = RouteMerger(recipe, root=out.parent, allow_outside=True).apply(recipe)
    assert max_logit_difference(routed, plain, plain.config.vocab_size) <= 1e-4


def test_routing_refuses_sources_of_another_hidden_size(experiment, tmp_path, capsys):
    make_tiny_model(experiment / "models" / "narrow", arch="llama", layers=2, hidden=16, seed=5)
    config = write_config(
        experiment, "narrow.yaml", space="dfs_paper", models=["models/expert_a", "models/narrow"], base_model=None
    )
    run_dir = tmp_path / "run"
    capsys.readouterr()
    assert main(["search", str(config), "--run-dir", str(run_dir), "--no-progress"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "hidden size" in err[0]
    assert not run_dir.exists()


def test_routing_accepts_sources_of_different_depth(experiment, tmp_path):
    make_tiny_model(experiment / "models" / "deep", arch="llama", layers=3, hidden=32, seed=6)
    config = write_config(
        experiment,
        "deep.yaml",
        space="dfs_paper",
        models=["models/expert_a", "models/deep"],
        base_model=None,
        budget={"trials": 3},
    )
    run_dir = tmp_path / "run"
    assert main(["search", str(config), "--run-dir", str(run_dir), "--no-progress"]) == 0
    used = {(s["model"], s["layer"]) for t in trials(run_dir) for s in t.user_attrs["recipe"]["route"]["layers"]}
    assert ("models/deep", 2) in used  # the deeper model's third layer is routable


def test_merge_source_only_in_a_hybrid(experiment, tmp_path, capsys):
    config = write_config(experiment, "bad_merge.yaml", space={"routing": {"sources": ["merge", "models/expert_a"]}})
    assert main(["search", str(config), "--run-dir", str(tmp_path / "r"), "--no-progress"]) == 2
    assert "merge" in capsys.readouterr().err


def test_route_depth_bounds_are_checked(experiment, tmp_path, capsys):
    config = write_config(experiment, "deep_bounds.yaml", space={"routing": {"repeats": 1, "max_depth": 40}})
    assert main(["search", str(config), "--run-dir", str(tmp_path / "r"), "--no-progress"]) == 2
    assert "max_depth" in capsys.readouterr().err
    torch.manual_seed(0)
