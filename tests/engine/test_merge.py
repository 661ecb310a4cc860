"""The to-disk path: sharded safetensors, a loadable model folder, a recipe
that rebuilds it bit for bit, and a cheap `import evomerge`."""

import hashlib
import json
import subprocess
import sys

import pytest
import torch
import transformers
import yaml
from helpers import read_tensors

from evomerge.app.cli import main
from evomerge.engine.merge import merge_to_disk
from evomerge.engine.recipe import Recipe, load_recipe


def _recipe(family, method="ties") -> Recipe:
    return Recipe.from_dict(
        {
            "method": method,
            "base_model": str(family.base),
            "sources": [
                {"model": str(family.ft[0]), "parameters": {"weight": [1.0, 0.2], "density": 0.4}},
                {"model": str(family.ft[1]), "parameters": {"weight": 0.6, "density": [0.9, 0.3]}},
            ],
            "dtype": "float32",
        }
    )


def _sha(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_sharded_output_is_a_loadable_model(family, tmp_path):
    recipe = _recipe(family)
    one = merge_to_disk(recipe, tmp_path / "one", allow_outside=True, progress=False)
    many = merge_to_disk(recipe, tmp_path / "many", allow_outside=True, progress=False, shard_bytes=40_000)
    shards = sorted(many.glob("model-*.safetensors"))
    assert len(shards) > 2
    index = json.loads((many / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"].values()) == {s.name for s in shards}
    a, b = read_tensors(one), read_tensors(many)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert set(index["weight_map"]) == set(b)
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in b.values())

    ids = torch.randint(4, 60, (2, 12))
    logits = [transformers.AutoModelForCausalLM.from_pretrained(p)(ids).logits for p in (one, many)]
    assert torch.equal(logits[0], logits[1])
    tok = transformers.AutoTokenizer.from_pretrained(one)
    assert tok.decode(tok("merge 42!")["input_ids"]) == "merge 42!"


def test_output_folder_contents_and_bit_identical_rebuild(llama, tmp_path):
    recipe = _recipe(llama, "dare_ties")
    out = merge_to_disk(recipe, tmp_path / "out", allow_outside=True, progress=False, seed=7)
    names = {p.name for p in out.iterdir()}
    assert {"config.json", "model.safetensors", "recipe.yaml", "README.md", "tokenizer.json"} <= names
    card = (out / "README.md").read_text()
    assert "dare_ties" in card and str(llama.ft[0]) in card and "sha256" in card

    saved = load_recipe(out / "recipe.yaml")
    assert saved.seed == 7
    assert all(s.sha256 and "model.safetensors" in s.sha256 for s in saved.sources)
    assert saved.sources[0].sha256["model.safetensors"] == _sha(llama.ft[0] / "model.safetensors")
    again = merge_to_disk(saved, tmp_path / "again", allow_outside=True, progress=False)
    assert _sha(out / "model.safetensors") == _sha(again / "model.safetensors")
    other_seed = merge_to_disk(saved, tmp_path / "seed8", allow_outside=True, progress=False, seed=8)
    assert _sha(out / "model.safetensors") != _sha(other_seed / "model.safetensors")


def test_sha256_pin_is_enforced(llama, tmp_path, capsys):
    data = yaml.safe_load(_recipe(llama).to_yaml())
    data["sources"][0]["sha256"] = {"model.safetensors": "0" * 64}
    path = tmp_path / "pinned.yaml"
    path.write_text(yaml.safe_dump(data))
    code = main(["merge", str(path), str(tmp_path / "o"), "--allow-outside-paths", "--no-progress"])
    assert code == 2 and "sha256" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_relative_paths_resolve_against_the_recipe_folder(llama, tmp_path, monkeypatch, capsys):
    import shutil

    for name, src in (("base", llama.base), ("a", llama.ft[0]), ("b", llama.ft[1])):
        shutil.copytree(src, tmp_path / "proj" / "models" / name)
    data = {
        "method": "task_arithmetic",
        "base_model": "models/base",
        "sources": [
            {"model": "models/a", "parameters": {"weight": 0.5}},
            {"model": "models/b", "parameters": {"weight": 0.5}},
        ],
    }
    (tmp_path / "proj" / "recipe.yaml").write_text(yaml.safe_dump(data))
    monkeypatch.chdir(tmp_path)  # somewhere else than the recipe's folder
    assert main(["merge", "proj/recipe.yaml", "merged", "--no-progress"]) == 0
    assert (tmp_path / "merged" / "model.safetensors").is_file()
    assert "merged task_arithmetic" in capsys.readouterr().out


@pytest.mark.parametrize("module", ["ray", "lm_eval", "optuna", "cma", "torch"])
def test_import_is_light(module):
    code = f"import sys, evomerge, evomerge.engine.recipe; sys.exit({module!r} in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0
