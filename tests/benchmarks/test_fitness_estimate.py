"""benchmarks/fitness_estimate.py on a stored SmolLM2 search: it reads the run's
per-document scores, and the pooled difference estimator's error is below the
subset mean's at an eighth of the documents (the committed study is fixed data)."""

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_the_estimator_benchmark_reads_a_stored_run(tmp_path):
    run = ROOT / "experiments/smollm2_multiskill/results/studies/ps_cma_evolve"
    out = tmp_path / "rows.json"
    cmd = [sys.executable, str(ROOT / "benchmarks/fitness_estimate.py"), str(run), "--fractions", "0.125"]
    cmd += ["--draws", "2", "--json", str(out)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    (row,) = json.loads(out.read_text())
    assert row["run"] == "ps_cma_evolve" and row["candidates"] > 50 and row["fraction"] == 0.125
    assert row["pooled_mae"] < row["plain_mae"]
    assert "| ps_cma_evolve |" in done.stdout


def test_runs_of_several_seeds_are_summarised_per_name():
    import importlib.util

    spec = importlib.util.spec_from_file_location("fitness_estimate", ROOT / "benchmarks/fitness_estimate.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    rows = [
        {"run": f"demo_plain_{seed}", "fraction": 0.125, "plain_mae": mae, "pooled_mae": mae / 2}
        | {"plain_spearman": 0.5, "pooled_spearman": 0.7}
        for seed, mae in enumerate([0.04, 0.06])
    ]
    table = module.by_seed(rows)
    (line,) = [line for line in table.splitlines() if line.startswith("| demo_plain |")]
    cells = [c.strip() for c in line.strip("|").split("|")]
    assert cells[:4] == ["demo_plain", "2", "0.125", "0.0500 ± 0.0100"] and cells[5] == "0.5000 ± 0.0000"
