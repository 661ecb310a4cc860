"""Bad input: a one-line error naming the problem and the fix, exit code 2,
no traceback, and nothing written."""

import errno
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file

from evomerge.app.cli import main
from evomerge.app.demo.tiny import make_tiny_model


def _recipe(tmp_path: Path, data: dict) -> Path:
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def _ties(base, *models, **params) -> dict:
    return {
        "merge_method": "ties",
        "base_model": str(base),
        "dtype": "float32",
        "models": [{"model": str(m), "parameters": {"weight": 0.5, "density": 0.5, **params}} for m in models],
    }


def run_cli(capsys, tmp_path, data, *extra, out="out"):
    """Run `evomerge merge` in-process; return (exit code, stderr, output path)."""
    recipe = _recipe(tmp_path, data) if isinstance(data, dict) else data
    out_dir = tmp_path / out
    code = main(["merge", str(recipe), str(out_dir), "--allow-outside-paths", "--no-progress", *extra])
    err = capsys.readouterr().err
    return code, err, out_dir


def assert_refused(code, err, out_dir, *words):
    assert code == 2
    lines = [line for line in err.strip().splitlines() if not line.startswith("merging")]
    assert len(lines) == 1, err
    assert lines[0].startswith("evomerge: error:"), err
    assert "Traceback" not in err
    for word in words:
        assert word in lines[0], (word, lines[0])
    assert not out_dir.exists() or not any(out_dir.iterdir())
    assert not [p for p in out_dir.parent.iterdir() if ".partial-" in p.name]


@pytest.fixture(scope="module")
def variants(llama, tmp_path_factory):
    """Models that differ from the llama family in one way each."""
    root = tmp_path_factory.mktemp("variants")
    v = {
        "wide": make_tiny_model(root / "wide", arch="llama", hidden=96),
        "deep": make_tiny_model(root / "deep", arch="llama", layers=5),
        "vocab": make_tiny_model(root / "vocab", arch="llama", vocab_size=200),
        "qwen": make_tiny_model(root / "qwen", arch="qwen2"),
    }
    missing = root / "missing"
    shutil.copytree(llama.ft[0], missing)
    tensors = load_file(missing / "model.safetensors")
    del tensors["model.layers.1.mlp.up_proj.weight"]
    save_file(tensors, missing / "model.safetensors", metadata={"format": "pt"})
    v["missing"] = missing
    corrupt = root / "corrupt"
    shutil.copytree(llama.ft[0], corrupt)
    weights = corrupt / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    v["corrupt"] = corrupt
    pickled = root / "pickled"
    pickled.mkdir()
    shutil.copy(llama.ft[0] / "config.json", pickled)
    torch.save({"w": torch.zeros(2)}, pickled / "pytorch_model.bin")
    v["pickled"] = pickled
    return v


@pytest.mark.parametrize(
    "variant, words",
    [
        ("wide", ["shape", "same architecture"]),
        ("deep", ["layer count"]),
        ("vocab", ["vocab size"]),
        ("qwen", ["architecture"]),
        ("missing", ["lacks tensor model.layers.1.mlp.up_proj.weight"]),
        ("corrupt", ["truncated or corrupt"]),
        ("pickled", ["pickle", "safetensors"]),
    ],
)
def test_incompatible_or_unsafe_sources(capsys, tmp_path, llama, variants, variant, words):
    code, err, out = run_cli(capsys, tmp_path, _ties(llama.base, llama.ft[0], variants[variant]))
    assert_refused(code, err, out, *words)


@pytest.mark.parametrize(
    "edit, words",
    [
        (lambda d: d.update(merge_method="frobnicate"), ["unknown merge method 'frobnicate'", "ties"]),
        (lambda d: d["models"][0]["parameters"].update(sharpness=2), ["unknown parameter 'sharpness'", "density"]),
        (lambda d: d["models"][0]["parameters"].update(density=0.0), ["density", "(0.0, 1.0]"]),
        (lambda d: d["models"][0]["parameters"].update(density=1.5), ["density", "(0.0, 1.0]"]),
        (lambda d: d["models"][0]["parameters"].update(density=[0.5, 1.2]), ["density"]),
        (lambda d: d["models"][0]["parameters"].update(weight=[0.1] * 5), ["gradient", "4 layers", "at most 4"]),
        (lambda d: d["models"][0].update(model="/nonexistent/model"), ["not found", "fix the path"]),
        (lambda d: d["models"][0]["parameters"].pop("weight"), ["needs parameter 'weight'"]),
    ],
)
def test_bad_recipes(capsys, tmp_path, llama, edit, words):
    data = _ties(llama.base, llama.ft[0], llama.ft[1])
    edit(data)
    code, err, out = run_cli(capsys, tmp_path, data)
    assert_refused(code, err, out, *words)


def test_missing_recipe_file_and_bad_yaml(capsys, tmp_path):
    code, err, out = run_cli(capsys, tmp_path, tmp_path / "nope.yaml")
    assert_refused(code, err, out, "does not exist")
    bad = tmp_path / "bad.yaml"
    bad.write_text("models: [unclosed\n")
    code, err, out = run_cli(capsys, tmp_path, bad)
    assert_refused(code, err, out, "not valid YAML")


@pytest.mark.parametrize(
    "device,words",
    [
        ("cpu,cpu", ["merge to disk runs on one device", "give one, e.g. cpu"]),
        ("tpu", ["unknown device 'tpu'", "cuda:0,cuda:1"]),
        ("cpu,,cpu", ["empty entry", "cuda:0,cuda:1"]),
    ],
)
def test_bad_devices(capsys, tmp_path, llama, device, words):
    data = _ties(llama.base, llama.ft[0], llama.ft[1])
    code, err, out = run_cli(capsys, tmp_path, data, "--device", device)
    assert_refused(code, err, out, *words)


def test_non_empty_output_needs_overwrite(capsys, tmp_path, llama):
    data = _ties(llama.base, llama.ft[0], llama.ft[1])
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("precious")
    code, err, _ = run_cli(capsys, tmp_path, data)
    assert code == 2 and "--overwrite" in err and "Traceback" not in err
    assert (out / "keep.txt").read_text() == "precious"
    code, _, _ = run_cli(capsys, tmp_path, data, "--overwrite")
    assert code == 0
    assert not (out / "keep.txt").exists() and (out / "model.safetensors").is_file()


def test_paths_may_not_escape_the_recipe_folder(capsys, tmp_path, llama):
    recipe = _recipe(tmp_path, _ties(llama.base, llama.ft[0]))
    code = main(["merge", str(recipe), str(tmp_path / "out"), "--no-progress"])
    err = capsys.readouterr().err
    assert code == 2 and "leads outside" in err and "of the recipe or search config" in err
    assert "--allow-outside-paths" in err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    "err_no, words",
    [
        (errno.ENOSPC, ["No space left", "free disk space"]),
        (errno.EACCES, ["Permission denied", "writable"]),
        (errno.ENOENT, ["No such file", "writable"]),
    ],
)
def test_write_errors_leave_nothing(capsys, tmp_path, llama, monkeypatch, err_no, words):
    import os

    from evomerge.engine import merge

    calls = {"n": 0}
    real_write = merge._ShardWriter.write

    def failing_write(self, name, tensor):
        calls["n"] += 1
        if calls["n"] == 5:  # fail part-way through the shard
            raise OSError(err_no, os.strerror(err_no))
        return real_write(self, name, tensor)

    monkeypatch.setattr(merge._ShardWriter, "write", failing_write)
    code, err, out = run_cli(capsys, tmp_path, _ties(llama.base, llama.ft[0], llama.ft[1]))
    assert calls["n"] == 5
    assert_refused(code, err, out, *words)
    assert ("free disk space" in err) == (err_no == errno.ENOSPC)  # the disk-space hint only for a full disk


@pytest.mark.skipif(not Path("/proc/self").is_dir(), reason="needs /proc")
def test_an_output_folder_where_none_can_be_made_is_one_line_without_the_disk_hint(capsys, tmp_path, llama):
    code, err, out = run_cli(capsys, tmp_path, _ties(llama.base, llama.ft[0]), out="/proc/x")
    assert out == Path("/proc/x")
    assert_refused(code, err, out, "/proc/x", "writable")
    assert "disk space" not in err


def test_real_process_exit_code_and_debug_traceback(tmp_path, llama):
    data = _ties(llama.base, llama.ft[0])
    data["merge_method"] = "frobnicate"
    recipe = _recipe(tmp_path, data)
    cmd = [sys.executable, "-m", "evomerge"]
    proc = subprocess.run([*cmd, "merge", str(recipe), str(tmp_path / "o")], capture_output=True, text=True)
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0 and "Traceback" not in proc.stderr
    proc = subprocess.run([*cmd, "--debug", "merge", str(recipe), str(tmp_path / "o")], capture_output=True, text=True)
    assert proc.returncode != 0 and "Traceback" in proc.stderr


# -- non-finite parameters and outputs (issue 17, item 2) ---------------------


def _linear(*models, weights, **shared) -> dict:
    return {
        "merge_method": "linear",
        "dtype": "float32",
        "models": [{"model": str(m), "parameters": {"weight": w}} for m, w in zip(models, weights)],
        **({"parameters": shared} if shared else {}),
    }


@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf"), "nan"])
def test_non_finite_parameters_are_refused(capsys, tmp_path, llama, value):
    data = _ties(llama.base, llama.ft[0], llama.ft[1])
    data["models"][1]["parameters"]["weight"] = value
    code, err, out = run_cli(capsys, tmp_path, data)
    assert_refused(code, err, out, "'weight'", "not a finite number")


@pytest.mark.parametrize("literal", [".nan", ".inf", "-.inf"])
def test_yaml_nan_and_inf_literals_are_refused(capsys, tmp_path, llama, literal):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(
        f"merge_method: slerp\nbase_model: {llama.base}\nmodels: [{{model: {llama.ft[0]}}}]\n"
        f"parameters: {{t: {literal}}}\n"
    )
    code, err, out = run_cli(capsys, tmp_path, recipe)
    assert_refused(code, err, out, "'t'", "not a finite number")


def test_non_finite_shared_parameter_is_refused(capsys, tmp_path, llama):
    data = _ties(llama.base, llama.ft[0], llama.ft[1])
    data["parameters"] = {"lambda": [1.0, float("inf")]}
    code, err, out = run_cli(capsys, tmp_path, data)
    assert_refused(code, err, out, "'lambda'", "not a finite number")


def test_weights_that_cancel_out_under_normalize(capsys, tmp_path, llama):
    code, err, out = run_cli(capsys, tmp_path, _linear(llama.ft[0], llama.ft[1], weights=[1.0, -1.0]))
    assert_refused(code, err, out, "sum to 0", "normalize: true", "set normalize: false")
    # Without normalising, the same weights are a plain (finite) difference.
    data = _linear(llama.ft[0], llama.ft[1], weights=[1.0, -1.0], normalize=False)
    code, _, out = run_cli(capsys, tmp_path, data)
    assert code == 0 and all(torch.isfinite(t).all() for t in load_file(out / "model.safetensors").values())


def test_weights_that_cancel_out_in_one_tensor_only(capsys, tmp_path, llama):
    data = _linear(llama.ft[0], llama.ft[1], weights=[1.0, [{"filter": "mlp.up_proj", "value": -1.0}, {"value": 1.0}]])
    code, err, out = run_cli(capsys, tmp_path, data)
    assert_refused(code, err, out, "sum to 0", "mlp.up_proj")


def test_overflowing_merge_is_not_written(capsys, tmp_path, llama):
    # 1e39 is a finite parameter, but no float32 tensor holds it: every output would be inf or NaN.
    data = _linear(llama.ft[0], llama.ft[1], weights=[1e39, 1e39], normalize=False)
    code, err, out = run_cli(capsys, tmp_path, data)
    assert_refused(code, err, out, "model.embed_tokens.weight", "NaN or inf", "smaller")


def test_overflowing_routed_merge_is_not_written(capsys, tmp_path, llama):
    # A hybrid: the merge overflows, and the route export must refuse it too.
    data = {
        "method": "linear",
        "dtype": "float32",
        "sources": [{"model": str(m), "parameters": {"weight": 1e39}} for m in llama.ft[:2]],
        "parameters": {"normalize": False},
        "route": {"layers": [{"model": "merge", "layer": 0}, {"model": "merge", "layer": 1}]},
    }
    code, err, out = run_cli(capsys, tmp_path, data)
    err = "\n".join(line for line in err.splitlines() if not line.startswith("Loading weights"))  # transformers' bar
    assert_refused(code, err, out, "routed model", "NaN or inf", "smaller")


def test_non_finite_source_tensor_is_named(capsys, tmp_path, llama):
    bad = tmp_path / "nan_model"
    shutil.copytree(llama.ft[1], bad)
    tensors = load_file(bad / "model.safetensors")
    tensors["model.norm.weight"][3] = float("nan")
    save_file(tensors, bad / "model.safetensors", metadata={"format": "pt"})
    code, err, out = run_cli(capsys, tmp_path, _ties(llama.base, llama.ft[0], bad))
    assert_refused(code, err, out, "model.norm.weight", "NaN or inf", str(bad))


def test_methods_listing_says_recipes_may_leave_the_search_range(capsys):
    assert main(["methods"]) == 0
    listing = capsys.readouterr().out
    assert "outside" in listing and "mergekit" in listing
    assert "valid (0.0, 1.0]" in listing  # density's limits are shown
    from evomerge.engine.methods import METHODS

    assert all(p.bounds[0] >= 0 for m in METHODS.values() for p in m.params if p.bounds)


# -- messages that name the right problem (issue 17, item 7) ------------------


def test_recipe_path_that_is_a_folder(capsys, tmp_path):
    folder = tmp_path / "recipes"
    folder.mkdir()
    code, err, out = run_cli(capsys, tmp_path, folder)
    assert_refused(code, err, out, "is a folder", "recipe YAML file")


@pytest.mark.parametrize("overwrite", [[], ["--overwrite"]])
def test_output_path_that_is_a_file(capsys, tmp_path, llama, overwrite):
    (tmp_path / "out").write_text("precious")
    code, err, _ = run_cli(capsys, tmp_path, _ties(llama.base, llama.ft[0], llama.ft[1]), *overwrite)
    assert code == 2 and err.count("\n") == 1 and "is a file" in err and "folder" in err, err
    assert (tmp_path / "out").read_text() == "precious"
    assert not [p for p in tmp_path.iterdir() if ".partial-" in p.name]


def test_model_path_that_is_a_file(capsys, tmp_path, llama):
    data = _ties(llama.base, llama.ft[0], llama.ft[1])
    data["models"][1]["model"] = str(llama.ft[1] / "config.json")
    code, err, out = run_cli(capsys, tmp_path, data)
    assert_refused(code, err, out, "is a file", "model folder")


@pytest.mark.parametrize(
    "argv",
    [
        ["merge", "r.yaml", "out", "--seed", "abc"],
        ["merge", "r.yaml", "out", "--shard-size", "lots"],
        ["export", "run", "--format", "bogus"],
    ],
)
def test_bad_option_values_exit_2(capsys, argv):
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("usage: evomerge") and "error:" in err and "Traceback" not in err


# -- the methods added for issue 20 --------------------------------------------


def _method(method: str, base, *models, shared=None, per_model=None) -> dict:
    data = {
        "merge_method": method,
        "dtype": "float32",
        "models": [
            {"model": str(m), "parameters": dict(per_model[i] if isinstance(per_model, list) else per_model or {})}
            for i, m in enumerate(models)
        ],
    }
    if base is not None:
        data["base_model"] = str(base)
    if shared:
        data["parameters"] = shared
    return data


@pytest.mark.parametrize(
    "make, words",
    [
        (
            lambda f: _method("multislerp", f.base, f.ft[0], f.ft[1], per_model=[{"weight": 1.0}, {"weight": -1.0}]),
            ["sum to 0", "normalize_weights: true", "set normalize_weights: false"],
        ),
        (
            lambda f: _method("multislerp", None, f.ft[0], f.ft[1], shared={"eps": 0.0}, per_model={"weight": 0.5}),
            ["'eps'", "(0.0, inf]"],
        ),
        (lambda f: _method("multislerp", f.base, f.base, per_model={"weight": 0.5}), ["at least 1 non-base"]),
        (lambda f: _method("multislerp", None, f.ft[0], f.ft[1]), ["needs parameter 'weight'"]),
        (lambda f: _method("nearswap", f.base, f.ft[0], shared={"t": -0.001}), ["'t'", "[0.0, inf]"]),
        (lambda f: _method("nearswap", f.base, f.ft[0]), ["needs parameter 't'"]),
        (lambda f: _method("nearswap", f.base, f.ft[0], f.ft[1], shared={"t": 0.001}), ["at most 2"]),
        (lambda f: _method("nearswap", None, f.ft[0], f.ft[1], shared={"t": 0.001}), ["needs a base model"]),
        (
            lambda f: _method("karcher", None, f.ft[0], f.ft[1], shared={"max_iter": 2.5}),
            ["'max_iter'", "whole number"],
        ),
        (lambda f: _method("karcher", None, f.ft[0], f.ft[1], shared={"max_iter": -1}), ["'max_iter'", "[0, inf]"]),
        (lambda f: _method("karcher", None, f.ft[0], f.ft[1], shared={"tol": -1e-5}), ["'tol'", "[0.0, inf]"]),
        (lambda f: _method("karcher", None, f.ft[0], shared={"tol": float("nan")}), ["'tol'", "not a finite number"]),
        (
            lambda f: _method("sce", f.base, f.ft[0], f.ft[1], shared={"select_topk": 1.5}),
            ["'select_topk'", "[0.0, 1.0]"],
        ),
        (lambda f: _method("sce", f.base, f.ft[0], shared={"select_topk": -0.1}), ["'select_topk'", "[0.0, 1.0]"]),
        (lambda f: _method("sce", None, f.ft[0], f.ft[1]), ["needs a base model"]),
        (lambda f: _method("sce", f.base, f.ft[0], per_model={"weight": 0.5}), ["unknown parameter 'weight'"]),
        (lambda f: _method("arcee_fusion", f.base, f.ft[0], f.ft[1]), ["at most 2"]),
        (lambda f: _method("arcee_fusion", None, f.ft[0], f.ft[1]), ["needs a base model"]),
        (lambda f: _method("arcee_fusion", f.base, f.ft[0], shared={"t": 0.5}), ["unknown parameter 't'"]),
        (lambda f: _method("ram", f.base, f.ft[0], shared={"epsilon": -1e-5}), ["'epsilon'", "[0.0, inf]"]),
        (lambda f: _method("ram", None, f.ft[0], f.ft[1]), ["needs a base model"]),
        (lambda f: _method("ramplus_tl", f.base, f.ft[0], shared={"epsilon": 0.0}), ["'epsilon'", "(0.0, inf]"]),
        (lambda f: _method("ramplus_tl", f.base, f.ft[0], shared={"r": -0.1}), ["'r'", "[0.0, inf]"]),
        (lambda f: _method("ramplus_tl", f.base, f.ft[0], shared={"alpha": [0.2, -1.0]}), ["'alpha'", "[0.0, inf]"]),
    ],
    ids=lambda v: v if isinstance(v, str) else None,
)
def test_bad_parameters_of_the_new_methods(capsys, tmp_path, llama, make, words):
    code, err, out = run_cli(capsys, tmp_path, make(llama))
    assert_refused(code, err, out, *words)


@pytest.mark.parametrize(
    "argv",
    [
        ["status", "run", "--top", "0"],
        ["report", "run", "--top", "-3"],
        ["search", "c.yaml", "--run-dir", "r", "--workers", "0"],
    ],
)
def test_a_count_below_one_on_the_command_line_is_refused(argv, capsys):
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2
    assert "give 1 or more" in capsys.readouterr().err
