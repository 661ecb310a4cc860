"""The config's memory section: the strategy chosen is printed at start and
recorded in run.yaml; a plan that cannot fit is refused before the baselines."""

import pytest
import yaml
from helpers import write_config

from evomerge.app.cli import main
from evomerge.run.config import SearchConfig


def test_memory_takes_a_strategy_name_or_a_section_and_stays_out_of_the_fingerprint(experiment):
    base = yaml.safe_load(write_config(experiment, "m.yaml").read_text())
    plain = SearchConfig.model_validate(base)
    lean = SearchConfig.model_validate({**base, "memory": "lean"})
    budget = SearchConfig.model_validate({**base, "memory": {"strategy": "auto", "budget": 0.5}})
    assert (plain.memory.strategy, lean.memory.strategy, budget.memory.budget) == ("auto", "lean", 0.5)
    assert plain.fingerprint() == lean.fingerprint() == budget.fingerprint()  # same bits, same experiment


@pytest.mark.slow
def test_the_strategy_is_printed_and_recorded(experiment, tmp_path, capsys):
    config = write_config(experiment, "lean.yaml", budget={"trials": 2}, memory="lean")
    run_dir = tmp_path / "run"
    assert main(["search", str(config), "--run-dir", str(run_dir), "--no-progress"]) == 0
    lines = capsys.readouterr().out.splitlines()
    memory = [line for line in lines if line.startswith("memory: ")]
    assert len(memory) == 1 and memory[0].startswith("memory: lean: ") and "model sizes" in memory[0]
    record = yaml.safe_load((run_dir / "run.yaml").read_text())["memory"]
    assert record["strategy"] == "lean" and record["asked"] == "lean" and record["planned_bytes"][0] > 0
    auto = write_config(experiment, "auto.yaml", budget={"trials": 1})
    assert main(["search", str(auto), "--run-dir", str(tmp_path / "auto"), "--no-progress"]) == 0
    assert "chosen by memory: auto" in capsys.readouterr().out  # tiny models: the cached strategy fits


def test_a_plan_that_cannot_fit_is_refused_before_anything_is_written(experiment, tmp_path, capsys):
    config = write_config(experiment, "tight.yaml", memory={"strategy": "auto", "budget": 1000})
    run_dir = tmp_path / "run"
    assert main(["search", str(config), "--run-dir", str(run_dir), "--no-progress"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "does not fit" in err and "memory budget" in err, err
    assert not run_dir.exists()
