"""`evomerge demo` beside a busy loop: torch's threads sized to the free cores
against one thread per core (what torch does by default).

Each variant runs the whole demo from scratch (models built, 200 trials) in a
fresh folder, while a Python busy loop keeps one core busy, and reports the
wall time and the demo's exit code. Run it on an otherwise quiet machine:

    .venv/bin/python benchmarks/demo_busy.py [--variants sized,all_cores] [--timeout 2400]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def run_demo(workdir: Path, env: dict[str, str], timeout: float) -> dict:
    cmd = [sys.executable, "-m", "evomerge", "demo", "--workdir", str(workdir), "--no-progress"]
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
        code, tail = proc.returncode, (proc.stdout + proc.stderr).strip().splitlines()[-3:]
    except subprocess.TimeoutExpired:
        code, tail = None, [f"timed out after {timeout:.0f} s"]
    return {"seconds": round(time.perf_counter() - t0, 1), "exit": code, "tail": tail}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--variants", default="sized,all_cores")
    ap.add_argument("--timeout", type=float, default=2400)
    args = ap.parse_args()
    cores = len(os.sched_getaffinity(0))
    base = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}
    base.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")
    envs = {"sized": base, "all_cores": {**base, "OMP_NUM_THREADS": str(cores)}}
    results = {"cores": cores, "date": time.strftime("%Y-%m-%d %H:%M"), "runs": {}}
    for name in args.variants.split(","):
        loop = subprocess.Popen([sys.executable, "-c", "while True: pass"])
        try:
            time.sleep(2)
            with tempfile.TemporaryDirectory() as tmp:
                results["runs"][name] = run_demo(Path(tmp) / "demo", envs[name], args.timeout)
        finally:
            loop.kill()
            loop.wait()
        print(name, json.dumps(results["runs"][name]), flush=True)
    print(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
