#!/usr/bin/env bash
# Create .venv and install evomerge into it. `--dev` adds the test tools
# (pytest, ruff, and mergekit 0.1.5, the reference the parity tests compare to).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
# torch first, pinned: on these machines torch==2.13.0 is a local CPU wheel,
# while any other request (including an unpinned dependency) pulls a multi-GB
# CUDA build. Once it is installed, the package's torch>=2.4 is satisfied.
.venv/bin/pip install --quiet --disable-pip-version-check torch==2.13.0
if [ "${1:-}" = "--dev" ]; then
  .venv/bin/pip install --quiet --disable-pip-version-check -e ".[dev]"
else
  .venv/bin/pip install --quiet --disable-pip-version-check -e .
fi
