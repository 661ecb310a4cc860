"""The run folder of a search: it holds ``run.yaml`` (the config, its
fingerprints and the storage URL), a ``.lock`` held by the one search driving
it, the Optuna study (``study.db``, SQLite, unless the config names another
storage) and the CMA-ES checkpoint."""

from __future__ import annotations

import fcntl
from pathlib import Path
from typing import Any

import yaml

from evomerge.engine.folder import atomic_write
from evomerge.errors import EvomergeError

RUN_FILE = "run.yaml"
OWN_STORAGE = "study.db"  # run.yaml's storage for a run's own database, in its folder
OWN_FILES = (RUN_FILE, OWN_STORAGE, "cma_state.pkl", "cma_state.pkl.tmp", "cma_state.tmp")


class RunFolder:
    """A run folder claimed by one search: its lock and its ``run.yaml``."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self._lock = None

    @property
    def run_file(self) -> Path:
        return self.path / RUN_FILE

    def read(self) -> dict[str, Any]:
        return yaml.safe_load(self.run_file.read_text()) or {}

    def write(self, record: dict[str, Any]) -> None:
        atomic_write(self.run_file, yaml.safe_dump(record, sort_keys=False))

    def claim(self, record: dict[str, Any], force: bool) -> dict[str, Any]:
        """Lock the folder for this search and write its ``run.yaml``.

        ``record`` is the new run's (fingerprints, config, storage URL). A
        folder of the same config keeps its storage and readiness; one of
        another config is refused unless ``force`` (then its files go).
        Returns the record written.
        """
        path = self.path
        if path.exists() and not path.is_dir():
            raise EvomergeError(f"run folder {path} is a file; pick another --run-dir")
        if (
            not self.run_file.is_file()
            and path.is_dir()
            and any(p.name != ".lock" for p in path.iterdir())
            and not force
        ):
            raise EvomergeError(f"run folder {path} is not empty and holds no evomerge run; use an empty --run-dir")
        try:
            path.mkdir(parents=True, exist_ok=True)
            self._lock = open(path / ".lock", "w")
        except OSError as e:
            raise EvomergeError(f"cannot create run folder {path} ({e.strerror}); pick a writable --run-dir") from None
        try:
            fcntl.flock(self._lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            raise EvomergeError(f"another evomerge process is running {path}; wait for it or stop it") from None
        if self.run_file.is_file():
            old = self.read()
            if old.get("config_fingerprint") != record["config_fingerprint"]:
                if not force:
                    raise EvomergeError(
                        f"run folder {path} belongs to a different config ({old.get('config_path')}); "
                        "use another --run-dir, or pass --force to start this config there afresh"
                    )
                for name in OWN_FILES:
                    (path / name).unlink(missing_ok=True)
            else:
                record = {**record, "storage": old.get("storage", record["storage"])}
                if old.get("study_ready"):
                    record["study_ready"] = True
        self.write(record)
        return record

    def mark_ready(self) -> None:
        # Readers (status, export) wait for this mark: opening an Optuna
        # storage stamps its schema version, which would race the search's
        # own stamping of a new database.
        record = self.read()
        if not record.get("study_ready"):
            self.write({**record, "study_ready": True})

    def release(self) -> None:
        if self._lock is not None:
            self._lock.close()
            self._lock = None


def storage_url(run_dir: str | Path, record: dict[str, Any]) -> str:
    """The storage URL of a run: the config's own storage (a shared database)
    as given; otherwise the run folder's ``study.db``, wherever the folder is
    now, so a copied or moved run uses its own database. (Runs written before
    recorded an absolute path to their database; it is not used.)"""
    if (record.get("config") or {}).get("storage"):
        return record["storage"]
    return f"sqlite:///{(Path(run_dir) / OWN_STORAGE).resolve()}"
