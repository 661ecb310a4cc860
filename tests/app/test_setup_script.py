"""scripts/setup.sh: one line per step, torch pinned first, options checked
before anything is made. Its pip and python are stand-ins that record their
calls, so nothing is installed."""

import os
import shutil
import stat
import subprocess
from pathlib import Path

SETUP = Path(__file__).resolve().parents[2] / "scripts" / "setup.sh"


def _executable(path: Path, body: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("#!/usr/bin/env bash\n" + body)
    path.chmod(path.stat().st_mode | stat.S_IEXEC)


def _tree(tmp_path: Path) -> Path:
    """A checkout with the script and a stand-in python that makes a stand-in venv."""
    root = tmp_path / "checkout"
    (root / "scripts").mkdir(parents=True)
    shutil.copy(SETUP, root / "scripts" / "setup.sh")
    pip = 'echo "pip $*" >> "$(dirname "$0")/../../calls"\n'
    venv = f"mkdir -p .venv/bin && cat > .venv/bin/pip <<'PIP'\n#!/usr/bin/env bash\n{pip}PIP\nchmod +x .venv/bin/pip\ncp .venv/bin/pip .venv/bin/python\n"
    _executable(tmp_path / "python", f'echo "python $*" >> calls\n{venv}')
    return root


def _run(root: Path, tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHON": str(tmp_path / "python")}
    return subprocess.run(["bash", "scripts/setup.sh", *args], cwd=root, env=env, capture_output=True, text=True)


def test_setup_says_each_step_and_installs_torch_first(tmp_path):
    root = _tree(tmp_path)
    done = _run(root, tmp_path, "--dev")
    assert done.returncode == 0, done.stderr
    steps = done.stderr.strip().splitlines()
    assert [line.split(":")[0] for line in steps] == ["setup.sh"] * len(steps)
    assert "creating the virtual environment" in steps[0]
    assert "installing torch 2.13.0" in steps[1] and "dev extras" in steps[2] and "done" in steps[-1]
    calls = (root / "calls").read_text().splitlines()
    assert calls[0] == "python -m venv .venv"
    assert "torch==2.13.0" in calls[1] and calls[2].endswith("-e .[dev]")
    again = _run(root, tmp_path)  # a second run keeps the venv
    assert "using the existing virtual environment" in again.stderr.splitlines()[0]


def test_an_unknown_option_is_refused_before_anything_is_made(tmp_path):
    root = _tree(tmp_path)
    refused = _run(root, tmp_path, "--dev", "--gpu")
    assert refused.returncode == 2
    assert refused.stderr.strip().count("\n") == 0 and "--gpu" in refused.stderr and "--dev" in refused.stderr
    assert not (root / ".venv").exists() and not (root / "calls").exists()
