#!/usr/bin/env bash
# Download into .whl/ the wheels a bare GPU machine (Python 3.12, x86-64,
# with torch, transformers, accelerate, pandas, pyarrow, scikit-learn and
# sacrebleu already installed, but nothing from PyPI reachable) needs to run
# evomerge from this source tree: lm-eval, Optuna, pycma and their
# dependencies, without Ray (its wheel alone is larger than what such a
# machine can be sent). benchmarks/gpu_check.sh installs them there.
#   scripts/device_wheels.sh [PYTHON_VERSION]   (default 3.12)
# Versions are the ones tested together here; packages published only as
# source are built into (pure-Python) wheels here.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${1:-3.12}
DEST=.whl
mkdir -p "$DEST"
grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >>.git/info/exclude
WHEELS=(
  lm_eval==0.4.13 datasets==5.2.0 evaluate==0.4.6 dill==0.4.1 multiprocess==0.70.19 more-itertools==11.2.1
  pytablewriter==1.2.1 DataProperty==1.1.1 mbstrdecoder==1.1.5 pathvalidate==3.3.1 tabledata==1.3.5
  tcolorpy==0.1.7 typepy==1.3.5 chardet==6.0.0.post1 nltk==3.10.4
  optuna==5.1.0 alembic==1.20.1 Mako==1.4.3 SQLAlchemy==2.1.9 colorlog==6.12.0 cma==4.5.0 cmaes==0.13.1
  pydantic==2.14.4 pydantic_core==2.50.5 annotated-types==0.8.0 typing-inspection==0.4.5
)
SOURCE_ONLY=(rouge_score==0.1.2 sqlitedict==2.1.0 word2number==1.1)
PLATFORMS=()
for n in 28 27 17; do PLATFORMS+=(--platform "manylinux_2_${n}_x86_64"); done
PLATFORMS+=(--platform manylinux2014_x86_64 --platform manylinux1_x86_64)
python3 -m pip download --quiet --disable-pip-version-check --no-deps --only-binary=:all: \
  --python-version "$PY" --implementation cp "${PLATFORMS[@]}" -d "$DEST" "${WHEELS[@]}"
python3 -m pip wheel --quiet --disable-pip-version-check --no-deps -w "$DEST" "${SOURCE_ONLY[@]}"
du -sh "$DEST"
