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


def test_a_budget_is_a_fraction_bytes_or_a_size(experiment):
    base = yaml.safe_load(write_config(experiment, "b.yaml").read_text())

    def budget(value):
        return SearchConfig.model_validate({**base, "memory": {"budget": value}}).memory.budget

    assert (budget(0.8), budget(5e9), budget("70GB"), budget("2GiB")) == (0.8, 5e9, 70e9, 2 * 2**30)
    for bad in ("lots", 0, "-3GB"):
        with pytest.raises(Exception, match="budget|positive"):
            budget(bad)


def test_plan_prints_every_strategy_and_what_the_config_would_take(experiment, capsys):
    config = write_config(experiment, "plan.yaml", memory="lean")
    assert main(["plan", str(config)]) == 0
    out = capsys.readouterr().out.splitlines()
    rows = {line.split()[0]: line for line in out if line.split() and line.split()[0] in ("cached", "lean", "offload")}
    assert set(rows) == {"cached", "lean", "offload"} and all(" yes" in row for row in rows.values())
    assert "(on a CPU, offload is lean)" in rows["offload"]
    assert out[-1].startswith("the config asks for lean: ")

    def sizes(row):  # the plan, in model sizes
        return float(row.split()[3])

    assert sizes(rows["cached"]) > sizes(rows["lean"]) == sizes(rows["offload"])  # ties caches its magnitude orders
    assert main(["plan", str(config), "--memory", "auto"]) == 0
    assert capsys.readouterr().out.splitlines()[-1].startswith("memory: auto takes cached: ")


def test_plan_refuses_in_one_line_when_nothing_fits_and_reads_recipes_too(experiment, tmp_path, capsys):
    config = write_config(experiment, "plan.yaml")
    assert main(["plan", str(config), "--memory-budget", "1000"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "does not fit" in err and "kB on cpu" in err, err
    data = yaml.safe_load(config.read_text())
    models = [str((config.parent / m).resolve()) for m in data["models"]]
    base = str((config.parent / data["base_model"]).resolve())
    recipe = tmp_path / "recipe.yaml"
    sources = [{"model": m, "parameters": {"weight": 0.5, "density": 0.5}} for m in models]
    recipe.write_text(yaml.safe_dump({"method": "ties", "base_model": base, "sources": [{"model": base}, *sources]}))
    assert main(["plan", str(recipe), "--allow-outside-paths"]) == 0
    assert "recipe" in capsys.readouterr().out
    assert main(["plan", str(recipe)]) == 2  # its models lie outside its folder
    assert main(["plan", str(tmp_path / "none.yaml")]) == 2


def test_plan_reads_routing_configs(experiment, capsys):
    hybrid = write_config(experiment, "hybrid_plan.yaml", space="hybrid_ties_dfs")
    assert main(["plan", str(hybrid)]) == 0
    out = capsys.readouterr().out
    assert "memory plan of search config" in out and out.splitlines()[-1].startswith("memory: auto takes ")
    routed = write_config(experiment, "route_plan.yaml", space="dfs_paper")
    assert main(["plan", str(routed)]) == 0  # routes over the sources' linear merge, held in place
    assert capsys.readouterr().out.splitlines()[-1].startswith("memory: auto takes ")
