"""Small helpers shared by the tests."""

from pathlib import Path

import torch
from safetensors.torch import load_file


def read_tensors(folder: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a model folder, across all its shards."""
    files = sorted(Path(folder).glob("*.safetensors"))
    assert files, f"no weights in {folder}"
    out: dict[str, torch.Tensor] = {}
    for f in files:
        out.update(load_file(f))
    return out
