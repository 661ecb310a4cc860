"""trust_remote_code is never on: a model that ships its own code is merged
as tensors, and its code never runs."""

import json
import shutil

import pytest

from evomerge.engine.merge import InPlaceMerger, merge_to_disk
from evomerge.engine.recipe import Recipe
from evomerge.errors import EvomergeError


@pytest.fixture
def remote_code_models(llama, tmp_path):
    marker = tmp_path / "code-ran"
    folders = []
    for i, src in enumerate([llama.base, llama.ft[0]]):
        dst = tmp_path / f"m{i}"
        shutil.copytree(src, dst)
        cfg = json.loads((dst / "config.json").read_text())
        cfg.update(model_type="evil_llama", auto_map={"AutoModelForCausalLM": "modeling_evil.EvilModel"})
        (dst / "config.json").write_text(json.dumps(cfg))
        (dst / "modeling_evil.py").write_text(f"open({str(marker)!r}, 'w').write('ran')\nEvilModel = None\n")
        folders.append(dst)
    return folders, marker


def test_remote_code_never_runs(remote_code_models, tmp_path):
    (base, ft), marker = remote_code_models
    recipe = Recipe.from_dict(
        {
            "method": "task_arithmetic",
            "base_model": str(base),
            "sources": [{"model": str(ft), "parameters": {"weight": 0.5}}],
        }
    )
    out = merge_to_disk(recipe, tmp_path / "out", allow_outside=True, progress=False)
    assert (out / "model.safetensors").is_file()
    assert json.loads((out / "config.json").read_text())["model_type"] == "evil_llama"
    with pytest.raises(EvomergeError, match="trust_remote_code"):
        InPlaceMerger(recipe, allow_outside=True)
    assert not marker.exists()
