"""The memory benchmarks run end to end on small shapes: benchmarks/memory_scale.py
(a fresh process per row; the lean strategy holds less than the cached one, and
the plan's prediction is printed beside the peak) and benchmarks/gpu_memory.py
(the GPU check's 7B step, dry-run on its small shape on the CPU)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"


@pytest.mark.slow
def test_memory_scale_measures_each_strategy_in_a_fresh_process(tmp_path):
    out = tmp_path / "rows.json"
    cmd = [sys.executable, str(BENCHMARKS / "memory_scale.py"), "--layers", "1", "--vocab", "512"]
    cmd += ["--experts", "2", "--methods", "ties", "--strategies", "cached,lean", "--dtypes", "float32"]
    cmd += ["--candidates", "1", "--workdir", str(tmp_path / "models"), "--json", str(out)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-2000:]
    rows = {r["strategy"]: r for r in json.loads(out.read_text())}
    assert set(rows) == {"cached", "lean"}
    cached, lean = rows["cached"], rows["lean"]
    assert cached["pid"] != lean["pid"]  # each row its own process
    # TIES's magnitude orders are real memory: the lean row's peak is lower,
    # and the plan says so too.
    assert lean["peak"] - lean["floor"] < cached["peak"] - cached["floor"]
    assert lean["predicted"] < cached["predicted"]
    table = done.stdout
    assert "| float32 | ties | 2 | cached |" in table and "| float32 | ties | 2 | lean |" in table
    assert "lean / cached s per candidate" in table


@pytest.mark.slow
def test_the_gpu_memory_step_runs_on_its_small_shape(tmp_path):
    out = tmp_path / "rows.json"
    cmd = [sys.executable, str(BENCHMARKS / "gpu_memory.py"), "--shape", "small", "--candidates", "2"]
    cmd += ["--workdir", str(tmp_path / "models"), "--json", str(out)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    *rows, check = json.loads(out.read_text())
    assert [r["method"] for r in rows] == ["ties", "dare_ties"] and check == {"offload_agrees": True}
    for row in rows:
        assert row["strategy"] in ("cached", "lean") and row["candidates"] == 2 and row["candidate_s"] > 0
        assert f"{row['method']}: memory: auto took {row['strategy']}: " in done.stdout


@pytest.mark.slow
def test_memory_scale_times_lean_against_cached_side_by_side(tmp_path):
    out = tmp_path / "ratios.json"
    cmd = [sys.executable, str(BENCHMARKS / "memory_scale.py"), "--ratios", "--layers", "1", "--vocab", "512"]
    cmd += ["--methods", "ties", "--dtypes", "float32", "--candidates", "1", "--workdir", str(tmp_path / "models")]
    cmd += ["--json", str(out)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-2000:]
    (row,) = json.loads(out.read_text())
    assert row["method"] == "ties" and row["cached_s"] > 0 and row["lean_s"] > 0 and row["build_s"] > 0
    assert "| float32 | ties | 2 |" in done.stdout and "lean / cached" in done.stdout
