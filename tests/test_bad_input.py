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

from evomerge.cli import main
from evomerge.tiny import make_tiny_model


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
    assert code == 2 and "outside the recipe's folder" in err and "--allow-outside-paths" in err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    "err_no, words", [(errno.ENOSPC, ["No space left", "free disk space"]), (errno.EACCES, ["Permission denied"])]
)
def test_write_errors_leave_nothing(capsys, tmp_path, llama, monkeypatch, err_no, words):
    import os

    from evomerge import merge

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


def test_real_process_exit_code_and_debug_traceback(tmp_path, llama):
    data = _ties(llama.base, llama.ft[0])
    data["merge_method"] = "frobnicate"
    recipe = _recipe(tmp_path, data)
    cmd = [sys.executable, "-m", "evomerge.cli"]
    proc = subprocess.run([*cmd, "merge", str(recipe), str(tmp_path / "o")], capture_output=True, text=True)
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0 and "Traceback" not in proc.stderr
    proc = subprocess.run([*cmd, "--debug", "merge", str(recipe), str(tmp_path / "o")], capture_output=True, text=True)
    assert proc.returncode != 0 and "Traceback" in proc.stderr
