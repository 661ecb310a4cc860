"""Writing an output model folder: the one place a merged or routed model is put on disk.

``write_model_folder`` runs the caller's weight writer and then adds what
every output folder holds: ``config.json`` (unless the weight writer wrote it),
the tokenizer files of a source folder, ``recipe.yaml`` and the model card
(``README.md``). All of it goes into a hidden sibling folder that is renamed
to the output at the end, so a failed write leaves nothing behind.
``pinned`` ties the recipe written there to the exact source files, by their
sha256. Nothing here imports torch.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from evomerge.engine.models import TOKENIZER_FILES, SourceModel, sha256_file
from evomerge.errors import EvomergeError

if TYPE_CHECKING:
    from evomerge.engine.recipe import Recipe


def check_output_folder(out_dir: Path | str, overwrite: bool) -> Path:
    """Refuse a non-empty output folder unless ``overwrite``, and a file even then."""
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise EvomergeError(f"output {out_dir} is a file, not a folder; give the path of a new or empty folder")
    if out_dir.exists() and any(out_dir.iterdir()) and not overwrite:
        raise EvomergeError(f"output folder {out_dir} is not empty; choose another or pass --overwrite")
    return out_dir


def write_fix(error: OSError, out_dir: Path) -> str:
    """What to do about a failed write, by its cause: the disk-space hint only for a full disk."""
    if error.errno in (errno.ENOSPC, errno.EDQUOT):
        return "free disk space or choose an output folder on another disk"
    if error.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return "choose a writable output folder"
    if error.errno in (errno.ENOENT, errno.ENOTDIR):
        if out_dir.parent.is_dir():  # a parent that takes no new folder (/proc, /sys)
            return "choose a writable output folder"
        return "create its parent folder or choose an output folder whose parent exists"
    return "choose another output folder"


def write_folder(out_dir: Path, write: Callable[[Path], None]) -> Path:
    """Run ``write(tmp)`` into a hidden sibling folder and rename it to
    ``out_dir`` at the end: a failed write leaves nothing behind."""
    tmp = out_dir.parent / f".{out_dir.name}.partial-{os.getpid()}"
    try:
        tmp.mkdir(parents=True, exist_ok=False)
        write(tmp)
        if out_dir.exists():
            shutil.rmtree(out_dir) if out_dir.is_dir() else out_dir.unlink()
        tmp.rename(out_dir)
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        raise EvomergeError(f"could not write {out_dir}: {e.strerror or e}; {write_fix(e, out_dir)}") from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir


def write_model_folder(
    out_dir: Path,
    write_weights: Callable[[Path], None],
    *,
    recipe: Recipe,
    card: str,
    config: dict | None = None,
    tokenizer_from: Path | str | None = None,
) -> Path:
    """Write a complete model folder at ``out_dir``, atomically.

    ``write_weights(tmp)`` writes the weight files (and ``config.json`` when
    ``config`` is None, as ``save_pretrained`` does); then come ``config``
    as JSON, the tokenizer files found in ``tokenizer_from``, ``recipe`` as
    ``recipe.yaml`` and ``card`` as ``README.md``.
    """

    def write(tmp: Path) -> None:
        write_weights(tmp)
        if config is not None:
            (tmp / "config.json").write_text(json.dumps(config, indent=2))
        copy_tokenizer(tokenizer_from, tmp)
        (tmp / "recipe.yaml").write_text(recipe.to_yaml())
        (tmp / "README.md").write_text(card)
        json.loads((tmp / "config.json").read_text())  # written and readable

    return write_folder(out_dir, write)


def copy_tokenizer(src: Path | str | None, out: Path) -> None:
    """Copy the tokenizer files (and generation config) that ``src`` has into ``out``."""
    if src is None:
        return
    src = Path(src)
    for fname in TOKENIZER_FILES:
        if (src / fname).is_file():
            shutil.copyfile(src / fname, out / fname)


def pinned(recipe: Recipe, sources: dict[str, SourceModel]) -> Recipe:
    """The recipe with every listed source pinned by the sha256 of its weight files."""

    def pin(group):
        out = []
        for s in group:
            if s.sha256:
                out.append(s)
                continue
            files = sorted(sources[s.model].path.glob("*.safetensors"))
            out.append(s.model_copy(update={"sha256": {f.name: sha256_file(f) for f in files}}))
        return out

    update = {"sources": pin(recipe.sources)}
    if recipe.route is not None and recipe.route.models:
        update["route"] = recipe.route.model_copy(update={"models": pin(recipe.route.models)})
    return recipe.model_copy(update=update)


def atomic_write(path: str | Path, data: str | bytes) -> None:
    """Write ``data`` to ``path`` through a sibling temporary file and a rename,
    so a reader (or a crash) never sees half a file. A path that cannot be
    written (a folder, no permission, a full disk) is an EvomergeError, and
    leaves nothing behind."""
    path = Path(path)
    if path.is_dir():
        raise EvomergeError(f"{path} is a folder; give the path of a file to write")
    tmp = path.with_name(path.name + ".tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(data, bytes):
            tmp.write_bytes(data)
        else:
            tmp.write_text(data, encoding="utf-8")
        os.replace(tmp, path)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise EvomergeError(f"cannot write {path} ({e.strerror or e}); pick a writable path") from None
