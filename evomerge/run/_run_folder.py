"""The run folder of a search: it holds ``run.yaml`` (the config, its
fingerprints and the storage URL), a ``.lock`` held by the one search driving
it, the Optuna study (``study.db``, SQLite, unless the config names another
storage) and the CMA-ES checkpoint."""

from __future__ import annotations

import contextlib
import fcntl
import os
import re
import sqlite3
import time
import urllib.parse
from pathlib import Path
from typing import Any

import yaml

from evomerge.engine.folder import atomic_write
from evomerge.errors import EvomergeError, first_line

RUN_FILE = "run.yaml"
OWN_STORAGE = "study.db"  # run.yaml's storage for a run's own database, in its folder
OWN_FILES = (RUN_FILE, OWN_STORAGE, "cma_state.pkl", "cma_state.pkl.tmp", "cma_state.tmp")


def study_file_problem(path: Path) -> str | None:
    """Why the SQLite study file at ``path`` cannot be read: it is not an
    SQLite database, or SQLite finds it damaged. None when it reads (or
    there is none yet)."""
    if not path.is_file() or path.stat().st_size == 0:
        return None  # a study not created yet
    try:
        with open(path, "rb") as f:
            if f.read(16) != b"SQLite format 3\x00":
                return "it is not an SQLite database"
        # Read-write, not read-only: a writer killed mid-transaction leaves a
        # hot journal, which only a connection that may write rolls back
        # (read-only, SQLite calls that "attempt to write a readonly database").
        with contextlib.closing(sqlite3.connect(f"file:{path}?mode=rw", uri=True)) as db:
            rows = db.execute("PRAGMA quick_check(1)").fetchall()
            db.execute("SELECT count(*) FROM sqlite_master").fetchone()
    except sqlite3.DatabaseError as e:
        return str(e) or type(e).__name__
    except OSError as e:
        return e.strerror or str(e)
    if rows and rows[0][0] != "ok":
        return str(rows[0][0])
    return None


def corrupt_study(run_dir: Path, problem: str, search: bool) -> EvomergeError:
    """The one line for a run folder whose own study file is damaged."""
    fix = "pass --force to start afresh in that folder" if search else "run the search with --force to start afresh"
    return EvomergeError(
        f"the study file {Path(run_dir) / OWN_STORAGE} is corrupt or unreadable ({problem}); "
        f"restore it from a backup, or {fix} (the damaged file is kept beside it)"
    )


def own_study_problem(run_dir: Path) -> str | None:
    """The problem with a run folder's own study file, if it is an evomerge
    run on its own storage and the file is damaged."""
    run_file = Path(run_dir) / RUN_FILE
    if not run_file.is_file():
        return None
    try:
        record = yaml.safe_load(run_file.read_text()) or {}
    except (yaml.YAMLError, OSError, UnicodeDecodeError):
        return None  # run.yaml's own problems are told where it is read
    if not isinstance(record, dict) or (record.get("config") or {}).get("storage"):
        return None
    return study_file_problem(Path(run_dir) / OWN_STORAGE)


def check_run_folder(run_dir: Path, own_storage: bool) -> None:
    """Refuse a run folder whose ``run.yaml`` or own study file is damaged
    (what a search checks before it reads any model; ``--force`` skips it)."""
    folder = RunFolder(run_dir)
    if folder.run_file.is_file():
        folder.read()
    problem = own_study_problem(run_dir) if own_storage else None
    if problem:
        raise corrupt_study(run_dir, problem, search=True)


class RunFolder:
    """A run folder claimed by one search: its lock and its ``run.yaml``."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self._lock = None

    @property
    def run_file(self) -> Path:
        return self.path / RUN_FILE

    def read(self) -> dict[str, Any]:
        """``run.yaml``; a damaged one is one line naming it and the fix."""
        try:
            record = yaml.safe_load(self.run_file.read_text())
        except (yaml.YAMLError, UnicodeDecodeError) as e:
            problem = first_line(e)
        except OSError as e:
            problem = e.strerror or str(e)
        else:
            if record is None or isinstance(record, dict):
                return record or {}
            problem = "it is not a mapping"
        raise EvomergeError(
            f"the run file {self.run_file} is corrupt or unreadable ({problem}); restore it from a backup, "
            "or pass --force to search to start afresh there (the damaged files are kept beside it)"
        )

    def readable(self) -> bool:
        """Whether ``run.yaml`` reads as a run's record."""
        try:
            self.read()
        except EvomergeError:
            return False
        return True

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
        if force and self.run_file.is_file() and not self.readable():
            self._set_aside(RUN_FILE)
            self._set_aside(OWN_STORAGE)  # whose run it was, nothing says any more
        if force and own_study_problem(path):
            self._set_aside(OWN_STORAGE)
            self.write({key: value for key, value in self.read().items() if key != "study_ready"})
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

    def _set_aside(self, name: str) -> None:
        """Keep a damaged file of the folder beside it, under a name of its
        own; the CMA-ES state, meaningless without its study, goes."""
        damaged = self.path / name
        if damaged.exists():
            damaged.rename(self.path / f"{name}.corrupt-{time.strftime('%Y%m%d-%H%M%S')}")
        for other in OWN_FILES[2:]:
            (self.path / other).unlink(missing_ok=True)

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


# ``user:secret@`` in a URL; what ``masked`` replaces the secret with.
_PASSWORD = re.compile(r"(?P<head>://[^/@:]*:)(?P<secret>[^@]*)@")
MASK = "***"


def masked(url: str) -> str:
    """``url`` with its password (if any) written as ``***``: the form every
    file and message shows. ``${VAR}`` stands as written."""
    return _PASSWORD.sub(
        lambda m: m["head"] + (m["secret"] if m["secret"].startswith("${") else MASK) + "@", url, count=1
    )


def connect_url(url: str) -> str:
    """The URL to connect with: ``${VAR}`` replaced by the environment's
    value, and a masked password (a run read back from its ``run.yaml``)
    left out, so the database driver takes it from its own sources
    (``PGPASSWORD``, a password file)."""
    for name in re.findall(r"\$\{(\w+)\}", url):
        if name not in os.environ:
            raise EvomergeError(
                f"the storage URL {masked(url)} names ${{{name}}}, which is not set; export {name} first"
            )
        match = _PASSWORD.search(url)
        value = os.environ[name]
        if match and match["secret"] == f"${{{name}}}":
            value = urllib.parse.quote(value, safe="")  # a password may hold ':', '@' or '/'
        url = url.replace(f"${{{name}}}", value)
    match = _PASSWORD.search(url)
    if match and match["secret"] == MASK:
        url = url[: match.start()] + match["head"].removesuffix(":") + "@" + url[match.end() :]
    return url
