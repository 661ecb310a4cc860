#!/usr/bin/env bash
# The GPU checks, as one prepared run for a GPU machine lent for minutes.
#
# Here, first: scripts/device_wheels.sh (lm-eval, Optuna, pycma and their
# dependencies as wheels in .whl/, ~21 MB). There, in the repository root,
# with .whl carried:
#   benchmarks/gpu_check.sh OUT_DIR
# It installs the wheels into /tmp/site (when .whl/ is there), then
#   1. runs tests/engine/test_devices.py: one model split over a GPU and the
#      CPU (and over two GPUs where there are two), checked against one device;
#   1b. a 7B-shaped search step (benchmarks/gpu_memory.py): a random Llama of
#      32 layers, hidden 4096, GQA 32/8, bfloat16, and three seeded
#      fine-tunes made on the GPU, then 5 TIES and 5 DARE-TIES candidates in
#      place with memory: auto (the strategy, peak GPU memory, s/candidate);
#   2. times the in-place merger on the GPU (benchmarks/merge_speed.py,
#      in place only: no mergekit there) against the GPU's copy bandwidth;
#   3. times the merge-and-evaluate loop, a search on the GPU
#      (benchmarks/search_throughput.py --no-loop: evomerge alone), on models
#      shaped like SmolLM2-135M and -360M.
# Logs and JSON go to OUT_DIR. MERGE_SIZES, LOOP_SIZES and LARGE_TRIALS
# override the sizes and the large models' candidates, MEMORY_SHAPE the 7B
# step's shape (e.g. for a dry run on a CPU: MERGE_SIZES=tiny
# LOOP_SIZES=tiny,135m LARGE_TRIALS=3 MEMORY_SHAPE=small).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${1:?give the folder the results go to}
mkdir -p "$OUT"
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1
if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    || { echo "gpu_check: the wheels in .whl did not install" >&2; exit 2; }
  export PYTHONPATH=/tmp/site:$PWD
fi
PYTHON=${PYTHON:-python3}
"$PYTHON" - <<'EOF' | tee "$OUT/machine.txt"
import torch, transformers
gpus = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
print(f"torch {torch.__version__}, transformers {transformers.__version__}, GPUs: {gpus or 'none'}")
EOF
status=0
step() {  # step NAME COMMAND...: run, log to OUT/NAME.log, remember a failure
  local name=$1; shift
  echo "== $name: $*"
  local t0=$SECONDS
  "$@" >"$OUT/$name.log" 2>&1 || { echo "   FAILED (see $name.log)"; status=1; }
  tail -n 8 "$OUT/$name.log"
  echo "   $((SECONDS - t0)) s"
}
step tests "$PYTHON" -m pytest -q -p no:cacheprovider tests/engine/test_devices.py -rs
step memory_7b "$PYTHON" benchmarks/gpu_memory.py --shape "${MEMORY_SHAPE:-7b}" --candidates 5 \
  --json "$OUT/gpu_memory.json"
step merge_speed "$PYTHON" benchmarks/merge_speed.py --sizes "${MERGE_SIZES:-tiny,large,large-bf16}" --repeats 0 \
  --candidates 10 --workdir /tmp/evomerge-bench --json "$OUT/merge_speed.json"
step search_throughput "$PYTHON" benchmarks/search_throughput.py --sizes "${LOOP_SIZES:-tiny,135m,360m}" --no-loop \
  --no-routing --trials 40 --large-trials "${LARGE_TRIALS:-20}" --workdir /tmp/evomerge-bench \
  --json "$OUT/search_throughput.json"
exit $status
