"""Session fixtures: tiny models made here, never downloaded."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

from evomerge.app.demo.tiny import make_finetune, make_tiny_model  # noqa: E402


class TinyFamily:
    """A tiny base model and three stand-in fine-tunes of it."""

    def __init__(self, root: Path, arch: str):
        self.arch = arch
        self.base = make_tiny_model(root / "base", arch=arch, seed=0)
        self.ft = [make_finetune(self.base, root / f"ft{i}", seed=i + 1) for i in range(3)]
        self.root = root


@pytest.fixture(scope="session", params=["llama", "qwen2"])
def family(request, tmp_path_factory) -> TinyFamily:
    """Llama-style (untied, GQA) and Qwen2-style (biases, tied embeddings)."""
    return _family(request.param, tmp_path_factory)


@pytest.fixture(scope="session")
def llama(tmp_path_factory) -> TinyFamily:
    return _family("llama", tmp_path_factory)


@pytest.fixture(scope="session")
def qwen2(tmp_path_factory) -> TinyFamily:
    return _family("qwen2", tmp_path_factory)


_FAMILIES: dict = {}


def _family(arch, tmp_path_factory):
    if arch not in _FAMILIES:
        _FAMILIES[arch] = TinyFamily(tmp_path_factory.mktemp(arch), arch)
    return _FAMILIES[arch]


N_DOCS = 24  # documents per task of the ``experiment`` fixture


@pytest.fixture(scope="module")
def experiment(tmp_path_factory):
    """A config folder: a tiny base, two fine-tunes, local dev and held-out tasks."""
    from helpers import write_sum_tasks

    root = tmp_path_factory.mktemp("search")
    base = make_tiny_model(root / "models" / "base", arch="llama", layers=2, hidden=32, seed=0)
    for i, name in enumerate(["expert_a", "expert_b"]):
        make_finetune(base, root / "models" / name, seed=i + 1, scale=0.5)
    write_sum_tasks(root / "tasks", N_DOCS)
    return root


@pytest.fixture(scope="session")
def postgres():
    """A PostgreSQL server on 127.0.0.1 for the session (tests/pg_server.py);
    skipped, with the reason, where it cannot start."""
    from pg_server import PostgresServer

    server = PostgresServer()
    try:
        yield server
    finally:
        server.stop()
