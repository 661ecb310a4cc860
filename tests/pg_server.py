"""A real PostgreSQL server for the tests: Debian's ``postgresql`` package,
started on 127.0.0.1 on a free port with a temporary data folder, a user
with a password (so that password handling is tested as users meet it).

The server refuses to run as root, so where the tests run as root it runs
as the package's ``postgres`` user (``runuser -u postgres --``). When it
cannot start, the tests that need it are skipped with the reason; CI sets
``EVOMERGE_REQUIRE_POSTGRES=1``, which turns that skip into a failure.
"""

from __future__ import annotations

import glob
import os
import shutil
import socket
import subprocess
import tempfile
from pathlib import Path

import pytest

USER = "evomerge"
PASSWORD = "pg-s3cret-4-tests"  # what the tests look for in every file and message


def _skip(reason: str):
    if os.environ.get("EVOMERGE_REQUIRE_POSTGRES") == "1":
        pytest.fail(f"PostgreSQL is required here (EVOMERGE_REQUIRE_POSTGRES=1): {reason}")
    pytest.skip(reason)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class PostgresServer:
    """One server for the test session; :meth:`url` gives each test its own database."""

    def __init__(self):
        found = sorted(glob.glob("/usr/lib/postgresql/*/bin/pg_ctl"))
        if not found:
            _skip("PostgreSQL is not installed (apt-get install postgresql; .ci/run and setup.sh --dev do)")
        try:
            import psycopg  # noqa: F401
        except ImportError:
            _skip("psycopg is not installed (scripts/setup.sh --dev installs it)")
        self.bin = Path(found[-1]).parent
        # Under /tmp itself: pytest's own folders are private to the test user, and
        # the server's user must reach its data folder.
        self.root = Path(tempfile.mkdtemp(prefix="evomerge-pg-", dir="/tmp"))
        self.root.chmod(0o755)
        self.as_user = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []
        self.port = _free_port()
        self.data = self.root / "data"
        self.started = False
        try:
            self._start()
        except (OSError, subprocess.CalledProcessError) as e:
            log = self.root / "log"
            tail = log.read_text().strip().splitlines()[-1:] if log.exists() else []
            detail = getattr(e, "stderr", None) or ""
            detail = detail.strip().splitlines()[-1] if detail.strip() else (tail[0] if tail else str(e))
            self.stop()
            _skip(f"the PostgreSQL server did not start: {detail}")

    def _run(self, *cmd: str) -> None:
        subprocess.run([*self.as_user, *cmd], check=True, capture_output=True, text=True, timeout=120)

    def _start(self) -> None:
        pwfile = self.root / "pw"
        pwfile.write_text(PASSWORD + "\n")
        if self.as_user:
            shutil.chown(self.root, "postgres")
            shutil.chown(pwfile, "postgres")
        pwfile.chmod(0o600)
        self._run(
            str(self.bin / "initdb"),
            "-D",
            str(self.data),
            "-U",
            USER,
            "--auth=scram-sha-256",
            f"--pwfile={pwfile}",
            "-E",
            "UTF8",
            "--no-sync",
        )
        options = f"-p {self.port} -k {self.root} -c listen_addresses=127.0.0.1 -c fsync=off"
        self._run(
            str(self.bin / "pg_ctl"),
            "-D",
            str(self.data),
            "-l",
            str(self.root / "log"),
            "-w",
            "-t",
            "60",
            "-o",
            options,
            "start",
        )
        self.started = True

    def url(self, database: str, password: str | None = PASSWORD) -> str:
        """A new, empty database and its SQLAlchemy URL (with ``password``
        written in it, or ``${NAME}``, or none)."""
        import psycopg

        with psycopg.connect(
            host="127.0.0.1", port=self.port, user=USER, password=PASSWORD, dbname="postgres", autocommit=True
        ) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{database}"')
            conn.execute(f'CREATE DATABASE "{database}"')
        auth = f"{USER}:{password}" if password else USER
        return f"postgresql+psycopg://{auth}@127.0.0.1:{self.port}/{database}"

    def stop(self) -> None:
        if self.started:
            subprocess.run(
                [*self.as_user, str(self.bin / "pg_ctl"), "-D", str(self.data), "-m", "immediate", "-w", "stop"],
                capture_output=True,
                timeout=120,
            )
            self.started = False
        shutil.rmtree(self.root, ignore_errors=True)
