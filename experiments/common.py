"""What the experiments' ``run.py`` scripts share: running ``evomerge`` in a
subprocess, keeping finished studies in the repository (so that a fresh
checkout rebuilds the tables without rerunning hours of search), and the
small statistics and text helpers of their tables."""

from __future__ import annotations

import math
import os
import shutil
import sqlite3
import sys
from pathlib import Path

ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}


def load_module(path: Path):
    """Import the file ``path`` as the module ``<folder>_<stem>``: every
    experiment has a ``problem.py``, and a plain ``import problem`` returns
    whichever was imported first in the process (the test suite imports both)."""
    import importlib.util

    name = f"{path.parent.name}_{path.stem}"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, path)
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules[name]


def evomerge_cli() -> str:
    """The ``evomerge`` command beside this Python."""
    return str(Path(sys.executable).parent / "evomerge")


def archive_run(run: Path, dst: Path) -> None:
    """Copy a run folder's study (a consistent SQLite backup) and run.yaml into ``dst``."""
    dst.mkdir(parents=True, exist_ok=True)
    tmp = dst / "study.db.tmp"
    tmp.unlink(missing_ok=True)
    src, out = sqlite3.connect(run / "study.db"), sqlite3.connect(tmp)
    with out:
        src.backup(out)
    src.close()
    out.close()
    tmp.replace(dst / "study.db")
    shutil.copy2(run / "run.yaml", dst / "run.yaml")


def restore_run(run: Path, src: Path, config: Path) -> bool:
    """Put an archived study (``src``) back as the run folder ``run`` when
    that lacks it (a fresh checkout), its storage pointing at the copy and its
    config at ``config``. True if the run is there."""
    import yaml

    if (run / "run.yaml").is_file():
        return True
    if not (src / "study.db").is_file():
        return False
    run.mkdir(parents=True, exist_ok=True)
    shutil.copy2(src / "study.db", run / "study.db")
    record = yaml.safe_load((src / "run.yaml").read_text())
    record["storage"] = f"sqlite:///{(run / 'study.db').resolve()}"
    record["config_path"] = str(config.resolve())
    (run / "run.yaml").write_text(yaml.safe_dump(record, sort_keys=False))
    return True


def median(xs: list[float]) -> float:
    xs = sorted(xs)
    return xs[len(xs) // 2] if xs else float("nan")


def mean_se(xs: list[float]) -> tuple[float, float]:
    """Mean and its standard error."""
    n = len(xs)
    m = sum(xs) / n
    var = sum((x - m) ** 2 for x in xs) / (n - 1)
    return m, math.sqrt(var / n)


def splice_table(doc: Path, table: str) -> None:
    """Replace the table between the markers of a RESULTS.md with ``table``."""
    start, end = "<!-- table: results/table.md -->\n", "<!-- end table -->"
    text = doc.read_text()
    if start in text and end in text:
        head, rest = text.split(start, 1)
        doc.write_text(head + start + table + rest[rest.index(end) :])
