"""Driver settings: checked against each driver's declaration when the config
is read (before any baseline is scored), and a CMA-ES search stays quiet."""

import json
import shutil
import warnings
from pathlib import Path

import pytest
import yaml
from helpers import trials, write_config

from evomerge.app.cli import main
from evomerge.errors import EvomergeError
from evomerge.run.config import SearchConfig, load_config

# driver settings -> what the one-line error must name (field, driver, range)
BAD = [
    ({"name": "cma", "popsize": -3}, ["driver.popsize", "cma", ">= 2"]),
    ({"name": "cma", "popsize": 0}, ["driver.popsize", "cma", ">= 2"]),
    ({"name": "cma", "popsize": 1}, ["driver.popsize", "cma", ">= 2"]),
    ({"name": "cma", "restarts": -2}, ["driver.restarts", "cma", ">= 0"]),
    ({"name": "cma", "sigma0": 0}, ["driver.sigma0", "cma", "(0, 1]"]),
    ({"name": "cma", "sigma0": 1.5}, ["driver.sigma0", "cma", "(0, 1]"]),
    ({"name": "cmaes", "popsize": -3}, ["driver.popsize", "cmaes", ">= 2"]),
    ({"name": "nsga2", "popsize": 1}, ["driver.popsize", "nsga2", ">= 2"]),
    ({"name": "tpe", "startup_trials": -4}, ["driver.startup_trials", "tpe", ">= 0"]),
    ({"name": "gp", "startup_trials": -1}, ["driver.startup_trials", "gp", ">= 0"]),
    # settings the driver does not read
    ({"name": "cma", "startup_trials": 2}, ["driver.startup_trials", "cma", "sigma0, popsize, restarts"]),
    ({"name": "tpe", "popsize": 4}, ["driver.popsize", "tpe", "startup_trials"]),
    ({"name": "random", "popsize": 4}, ["driver.popsize", "random", "no settings"]),
    ({"name": "nsga2", "restarts": 3}, ["driver.restarts", "nsga2", "popsize"]),
]


@pytest.mark.parametrize("driver, fragments", BAD, ids=[str(d) for d, _ in BAD])
def test_a_bad_driver_setting_is_refused_when_the_config_is_read(experiment, driver, fragments):
    config = write_config(experiment, "bad_driver.yaml", driver=driver)
    with pytest.raises(EvomergeError) as e:
        load_config(config)
    message = str(e.value)
    assert len(message.splitlines()) == 1
    assert all(f in message for f in fragments), message
    assert "fix" in message or "remove" in message, message


@pytest.mark.parametrize(
    "driver, fragment",
    [
        ({"name": "cma", "popsize": -3}, "driver.popsize"),
        ({"name": "nsga2", "popsize": 1}, "driver.popsize"),
        ({"name": "tpe", "startup_trials": -4}, "driver.startup_trials"),
        ({"name": "cma", "startup_trials": 2}, "driver.startup_trials"),
    ],
)
def test_the_cli_refuses_a_bad_driver_setting_before_writing_anything(experiment, tmp_path, capsys, driver, fragment):
    config = write_config(experiment, "bad_driver_cli.yaml", driver=driver)
    run_dir = tmp_path / "run"
    assert main(["search", str(config), "--run-dir", str(run_dir), "--no-progress"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and fragment in err and driver["name"] in err, err
    assert not run_dir.exists()


def _at_limits(declared):
    """Valid driver sections: each declared setting at its lowest and highest
    allowed value (an open limit nudged inside)."""
    for driver, settings in declared.items():
        yield {"name": driver}
        for field, s in settings.items():
            if s.low is not None:
                yield {"name": driver, field: s.kind(s.low + (0.001 if s.low_open else 0))}
            if s.high is not None:
                yield {"name": driver, field: s.kind(s.high)}
            yield {"name": driver, field: s.default}


def test_valid_settings_pass_and_a_config_dump_reads_back(experiment):
    from evomerge.run.drivers import DRIVERS

    for name, (_, settings) in DRIVERS.items():
        assert settings().name == name  # each row's settings model is tagged by its own name
    for driver in _at_limits({name: settings.declared() for name, (_, settings) in DRIVERS.items()}):
        cfg, _ = load_config(write_config(experiment, "good_driver.yaml", driver=driver))
        assert type(cfg.driver) is DRIVERS[driver["name"]][1]
        dumped = cfg.model_dump(mode="json")
        # the stored shape of the driver section is unchanged (config fingerprints of old runs)
        assert list(dumped["driver"]) == ["name", "sigma0", "popsize", "restarts", "startup_trials"]
        # a worker re-reads the dump, defaults of unread settings included
        again = SearchConfig.model_validate(dumped)
        assert again.fingerprint() == cfg.fingerprint()


def test_drivers_use_their_declared_defaults(monkeypatch):
    import optuna

    made = {}
    monkeypatch.setattr(optuna.samplers, "NSGAIISampler", lambda **kw: made.update(kw))
    nsga2 = SearchConfig.model_validate(_minimal("nsga2")).driver
    nsga2.sampler(seed=0)
    assert nsga2.popsize is None  # the stored value: the driver's own default
    assert made["population_size"] == nsga2.declared()["popsize"].default == 16
    cma = SearchConfig.model_validate(_minimal("cma")).driver
    assert (cma.value("sigma0"), cma.value("popsize"), cma.value("restarts")) == (0.2, None, 9)
    with pytest.raises(KeyError):
        cma.value("startup_trials")  # not a cma setting


OLD_RUNS = Path(__file__).parent / "data" / "old_runs"  # made by data/make_old_runs.py at 9752c0e


def test_every_driver_section_keeps_the_fingerprint_runs_made_before_carry():
    from evomerge.run.drivers import DRIVERS

    stored = json.loads((OLD_RUNS / "fingerprints.json").read_text())
    base = {k: v for k, v in stored["config"].items() if k != "driver"}
    sections = [entry["driver"] for entry in stored["fingerprints"]]
    assert {section.get("name", "cma") for section in sections} == set(DRIVERS)
    for entry in stored["fingerprints"]:
        data = {**base, "driver": entry["driver"]} if entry["driver"] else base
        assert SearchConfig.model_validate(data).fingerprint() == entry["fingerprint"], entry["driver"]


@pytest.mark.parametrize("name", ["tpe", "nsga2"])
def test_a_run_made_before_the_settings_split_opens_resumes_and_exports(experiment, tmp_path, capsys, name):
    """A stored run folder (its run.yaml lists every driver's knobs) reads
    back, continues under a larger budget, and exports its best."""
    stored = OLD_RUNS / name
    config = yaml.safe_load((stored / "config.yaml").read_text())
    config["budget"] = {"trials": 5}  # the budget may change between sessions
    path = experiment / f"old_{name}.yaml"
    path.write_text(yaml.safe_dump(config))
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    for part in ("run.yaml", "study.db"):
        shutil.copy(stored / part, run_dir / part)
    assert len(trials(run_dir, "search")) == 3
    assert main(["status", str(run_dir)]) == 0
    assert main(["search", str(path), "--run-dir", str(run_dir), "--no-progress"]) == 0
    assert len(trials(run_dir, "search")) == 5  # resumed: the three stored trials kept, two more
    assert yaml.safe_load((run_dir / "run.yaml").read_text())["config"]["driver"]["name"] == name
    out = tmp_path / "best.yaml"
    assert main(["export", str(run_dir), "--out", str(out), "--no-progress"]) == 0
    kept = yaml.safe_load((stored / "run.yaml").read_text())["config_fingerprint"]
    assert yaml.safe_load(out.read_text())["metadata"]["evomerge"]["config_fingerprint"] == kept
    capsys.readouterr()


def _minimal(driver: str) -> dict:
    return {
        "models": ["a"],
        "space": "x",
        "eval": {"objectives": [{"task": "t", "metric": "acc"}]},
        "driver": {"name": driver},
    }


@pytest.mark.slow
def test_a_cma_search_with_baseline_injection_prints_no_injection_warning(experiment, tmp_path, capsys):
    # popsize 2 and 6 trials: three generations, the first made of injected
    # baselines, enough for pycma to call an injected solution "orphanated".
    config = write_config(experiment, "quiet_cma.yaml", budget={"trials": 6}, driver={"name": "cma", "popsize": 2})
    run_dir = tmp_path / "run"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert main(["search", str(config), "--run-dir", str(run_dir), "--no-progress"]) == 0
    noisy = [w for w in caught if "Injection" in w.category.__name__ or "orphanated" in str(w.message)]
    assert not noisy, [str(w.message).splitlines()[0] for w in noisy]
    err = capsys.readouterr().err
    assert "orphanated" not in err and "InjectionWarning" not in err
    assert len(trials(run_dir, "search")) == 6


def test_cma_searches_a_space_of_one_parameter(experiment, tmp_path):
    """pycma refuses one dimension; the driver adds an unused coordinate, so
    slerp's global t is searched, each trial's t from CMA-ES's own point."""
    config = write_config(
        experiment,
        "one_gene.yaml",
        models=["models/expert_a"],
        space={"methods": ["slerp"], "search": {"t": None}},
        heldout=None,
        budget={"trials": 6},
        driver={"name": "cma", "popsize": 3},
    )
    run_dir = tmp_path / "run"
    assert main(["search", str(config), "--run-dir", str(run_dir), "--no-progress"]) == 0
    search = trials(run_dir, "search")
    ts = [t.params["t"] for t in search]
    assert len(search) == 6 and len(set(ts)) == 6 and all(0 <= t <= 1 for t in ts)
