"""Reading source models: memory-mapped safetensors, sha256, architecture facts.

Only safetensors are read. Pickle checkpoints (``*.bin``, ``*.pt``) are
refused, because unpickling runs arbitrary code. ``config.json`` is read as
JSON, so no model code is ever imported from a source folder.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from functools import cached_property
from pathlib import Path

from evomerge.errors import EvomergeError

# "model.layers.3.mlp.up_proj.weight" -> ("model.layers", 3, "mlp.up_proj.weight")
_LAYER = re.compile(r"^(?P<prefix>(?:.*\.)?(?:layers|h|blocks))\.(?P<index>\d+)\.(?P<rest>.+)$")
_PICKLES = ("*.bin", "*.pt", "*.pth", "*.ckpt", "*.pkl")
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    "added_tokens.json",
    "chat_template.jinja",
    "generation_config.json",
)


def split_layer_name(name: str) -> tuple[str, int, str] | None:
    """(prefix, layer index, rest) for a per-layer tensor name, else None."""
    m = _LAYER.match(name)
    return (m["prefix"], int(m["index"]), m["rest"]) if m else None


def is_pre_layer(name: str) -> bool:
    """Whether a non-layer tensor sits before the layers (embeddings) rather
    than after them (final norm, LM head)."""
    return "embed" in name or name.split(".")[-2:-1] in (["wte"], ["wpe"])


def resolve_model_path(ref: str, root: Path, allow_outside: bool = False) -> Path:
    """Turn a recipe's model reference into a local folder.

    Relative paths resolve against ``root`` (the folder of the recipe or
    search config). A path that leads outside ``root`` is refused unless
    ``allow_outside``. A reference that is not a local path but looks like
    ``org/name`` is looked up as a Hugging Face id (from the local cache when
    offline).
    """
    root = root.resolve()
    candidate = (root / ref).resolve() if not os.path.isabs(ref) else Path(ref).resolve()
    if candidate.is_dir():
        if not allow_outside and not candidate.is_relative_to(root):
            raise EvomergeError(
                f"model path {ref!r} leads outside {root}, the folder of the recipe or search config; "
                "move the model inside it or pass --allow-outside-paths"
            )
        return candidate
    if candidate.exists():
        where = "" if Path(ref) == candidate else f" ({candidate})"
        raise EvomergeError(
            f"model {ref!r}{where} is a file, not a model folder; "
            "give the folder that holds its config.json and *.safetensors files"
        )
    if re.fullmatch(r"[\w.-]+/[\w.-]+", ref) and not ref.startswith("."):
        return _from_hub(ref)
    raise EvomergeError(
        f"model {ref!r} not found (looked for folder {candidate}); fix the path in the recipe or search config"
    )


def _from_hub(repo_id: str) -> Path:
    try:
        from huggingface_hub import snapshot_download

        path = snapshot_download(
            repo_id,
            allow_patterns=["*.safetensors", "*.json", "tokenizer*", "*.txt", "*.model", "*.jinja"],
        )
    except Exception as e:  # noqa: BLE001 - any hub failure has one user-facing fix
        raise EvomergeError(
            f"model {repo_id!r} is neither a local folder nor available from the Hugging Face hub "
            f"({type(e).__name__}); download it or fix the reference"
        ) from None
    return Path(path)


def sha256_file(path: Path, chunk: int = 1 << 23) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


class SourceModel:
    """A model folder opened for streaming reads.

    Tensors are memory-mapped by safetensors and copied out one at a time, so
    reading a model never holds more than the tensor being read. Headers stay
    open for shapes and dtypes.
    """

    def __init__(self, path: Path, ref: str | None = None, sha256: dict[str, str] | None = None):
        self.path = Path(path)
        self.ref = ref or str(path)
        if not self.path.is_dir():
            raise EvomergeError(f"model folder {self.path} does not exist; fix the path")
        files = sorted(self.path.glob("*.safetensors"))
        if not files:
            pickles = [p.name for pattern in _PICKLES for p in self.path.glob(pattern)]
            if pickles:
                raise EvomergeError(
                    f"model {self.ref} has only pickle checkpoints ({pickles[0]}), which can run code when loaded; "
                    "convert it to safetensors first"
                )
            raise EvomergeError(f"model {self.ref} has no *.safetensors weight files; point to a model folder")
        if sha256:
            self._verify(sha256, files)
        self._handles = {}
        self._file_of: dict[str, str] = {}
        from safetensors import SafetensorError, safe_open

        for f in files:
            try:
                handle = safe_open(str(f), framework="pt")
            except (SafetensorError, OSError, ValueError) as e:
                raise EvomergeError(
                    f"weight file {f} is truncated or corrupt ({str(e).splitlines()[0][:80]}); re-save or re-download it"
                ) from None
            self._handles[f.name] = handle
            for key in handle.keys():
                self._file_of[key] = f.name

    def _verify(self, expected: dict[str, str], files: list[Path]) -> None:
        names = {f.name for f in files}
        for name, digest in expected.items():
            if name not in names:
                raise EvomergeError(f"model {self.ref} has no file {name} pinned by sha256; fix the recipe's sha256")
            actual = sha256_file(self.path / name)
            if actual != digest:
                raise EvomergeError(
                    f"sha256 of {self.ref}/{name} is {actual[:12]}..., the recipe pins {digest[:12]}...; "
                    "use the exact model the recipe was made with"
                )

    @cached_property
    def config(self) -> dict:
        cfg = self.path / "config.json"
        if not cfg.is_file():
            raise EvomergeError(f"model {self.ref} has no config.json; it must be a Hugging Face model folder")
        try:
            return json.loads(cfg.read_text())
        except json.JSONDecodeError:
            raise EvomergeError(f"{cfg} is not valid JSON; repair or re-download it") from None

    @property
    def names(self) -> list[str]:
        return list(self._file_of)

    def has(self, name: str) -> bool:
        return name in self._file_of

    def _slice(self, name: str):
        try:
            return self._handles[self._file_of[name]].get_slice(name)
        except KeyError:
            raise EvomergeError(
                f"model {self.ref} lacks tensor {name}; merge only models of the same architecture"
            ) from None

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._slice(name).get_shape())

    def dtype_name(self, name: str) -> str:
        return self._slice(name).get_dtype()

    def get(self, name: str):
        """Read one tensor (a copy out of the memory map).

        The file is mapped for this read only: a mapping kept open would count
        every page read so far in the process's resident memory, so a
        streamed merge would seem to hold all its sources.
        """
        from safetensors import safe_open

        self._slice(name)  # uniform error for a missing tensor
        with safe_open(str(self.path / self._file_of[name]), framework="pt") as f:
            return f.get_tensor(name)

    @property
    def num_layers(self) -> int:
        cfg = self.config
        for key in ("num_hidden_layers", "n_layer", "num_layers"):
            if isinstance(cfg.get(key), int):
                return cfg[key]
        indices = [s[1] for s in map(split_layer_name, self.names) if s]
        return max(indices) + 1 if indices else 0

    @property
    def architecture(self) -> str:
        archs = self.config.get("architectures") or [self.config.get("model_type", "?")]
        return archs[0]

    def layer_names(self, index: int) -> list[tuple[str, str]]:
        """(prefix, rest) of every tensor in layer ``index``, in file order."""
        out = []
        for name in self.names:
            parts = split_layer_name(name)
            if parts and parts[1] == index:
                out.append((parts[0], parts[2]))
        return out

    def non_layer_names(self) -> list[str]:
        return [n for n in self.names if split_layer_name(n) is None]
