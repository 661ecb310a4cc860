"""`evomerge search`, `status` and `export` end to end on tiny models."""

import hashlib
import json

import optuna
import pytest
import torch
import yaml
from helpers import check_two_drivers, completed, driver_settings, kill_search_after, slow_eval, trials, write_config
from safetensors.torch import load_file

from evomerge.app.cli import main
from evomerge.run.run import Run
from evomerge.run.store import RunStore


@pytest.mark.slow
@pytest.mark.parametrize("driver", ["cma", "tpe", "gp", "cmaes", "random", "nsga2"])
def test_every_driver_searches_end_to_end(experiment, tmp_path, driver):
    objectives = [{"task": "sums", "metric": "acc"}]
    if driver == "nsga2":
        objectives.append({"perplexity": "tasks/sums.jsonl", "direction": "minimize"})
    config = write_config(
        experiment,
        f"{driver}.yaml",
        driver=driver_settings(driver, popsize=4, startup_trials=2),
        eval={"include_path": "tasks", "objectives": objectives, "batch_size": 32, "samples": 16},
    )
    run_dir = tmp_path / "run"
    assert main(["search", str(config), "--run-dir", str(run_dir), "--no-progress"]) == 0
    search = trials(run_dir, "search")
    baselines = trials(run_dir, "baseline")
    assert len(search) == 6
    # every source alone plus linear, task arithmetic, TIES and DARE-TIES
    assert len(baselines) == 3 + 4
    assert all(t.user_attrs["status"] == "ok" for t in search + baselines)
    # the driver really proposed different points of the space
    assert len({json.dumps(t.params, sort_keys=True) for t in search}) > 1
    assert all(t.params for t in search)
    study = RunStore.open(run_dir).study
    assert len(study.directions) == (2 if driver == "nsga2" else 1)
    # baselines expressible in the space carry their point, for the samplers to learn from
    ta = next(t for t in baselines if t.user_attrs["name"].startswith("task_arithmetic"))
    assert ta.params and all(v == 1.0 for v in ta.params.values())


@pytest.mark.slow
def test_scores_are_real_and_the_best_gets_a_heldout_score(experiment, tmp_path):
    run_dir = tmp_path / "run"
    run = Run(write_config(experiment), run_dir, progress=False)
    try:
        best = run.search()
        assert best.heldout_fitness is not None
        # re-scoring a recorded search trial's recipe gives its recorded fitness
        from evomerge.engine.recipe import Recipe

        t = trials(run_dir, "search")[-1]
        again = run.worker.dev.score(run.worker.merger.apply(Recipe.model_validate(t.user_attrs["recipe"])))
        assert again.fitness(run.objectives) == t.user_attrs["fitness"]
        # baselines were scored on the held-out set; search trials were not (except the best)
        assert all("heldout" in b.user_attrs for b in trials(run_dir, "baseline"))
        others = [s for s in trials(run_dir, "search") if s.number != best.number]
        assert not any("heldout" in s.user_attrs for s in others)
    finally:
        run.close()


@pytest.mark.slow
def test_the_top_search_trials_get_heldout_scores_when_asked(experiment, tmp_path):
    # budget.heldout_top may be raised on a finished run (the budget is not
    # part of the run's identity): resuming scores only what is missing.
    from evomerge.engine.recipe import Recipe

    run_dir = tmp_path / "run"
    assert main(["search", str(write_config(experiment)), "--run-dir", str(run_dir), "--no-progress"]) == 0
    config = write_config(experiment, budget={"trials": 6, "heldout_top": 3})
    run = Run(config, run_dir, progress=False)
    try:
        calls = []
        score = run.worker.score
        run.worker.score = lambda recipe, which: calls.append(which) or score(recipe, which)
        run.search()
        held = {r.number: r.heldout_fitness for r in run.store.trials("search")}
        ranked = sorted(trials(run_dir, "search"), key=lambda t: (-t.user_attrs["fitness"], t.number))
        scored = [t for t in ranked if held[t.number] is not None]
        assert [t.number for t in scored] == [t.number for t in ranked[:3]]
        # the best was scored by the first session; this one scored the next two only
        assert calls == ["heldout", "heldout"]
        # each recorded held-out score is the recipe's real score on the held-out tasks
        for t in scored:
            model = run.worker.merger.apply(Recipe.model_validate(t.user_attrs["recipe"]))
            again = run.worker.heldout.score(model).fitness(list(run.cfg.heldout.objectives))
            assert again == held[t.number]
        calls.clear()
        run.finish()
        assert calls == []
    finally:
        run.close()


@pytest.mark.slow
def test_a_failing_candidate_is_recorded_and_the_search_goes_on(experiment, tmp_path, monkeypatch):
    run = Run(write_config(experiment), tmp_path / "run", progress=False)
    real = run.worker.merger.apply
    calls = []

    def flaky(recipe):
        calls.append(1)
        if len(calls) in (1, 3):
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        model = real(recipe)
        if len(calls) == 2:
            next(model.parameters()).data.view(-1)[0] = float("nan")
        return model

    try:
        run.run_baselines()
        monkeypatch.setattr(run.worker.merger, "apply", flaky)  # the first three search candidates fail
        run.search()
    finally:
        run.close()
    search = trials(tmp_path / "run", "search")
    assert len(search) == 6
    failed = [t for t in search if t.user_attrs["status"] == "failed"]
    assert len(failed) == 3
    reasons = " ".join(t.user_attrs["reason"] for t in failed)
    assert "out of memory" in reasons.lower() and "non-finite" in reasons
    # the optimizer got the worst fitness seen before, not a crash
    ok = [t.values[0] for t in trials(tmp_path / "run") if t.user_attrs["status"] == "ok"]
    assert all(t.values[0] >= min(ok) - 1e-12 and t.values[0] <= max(ok) for t in failed)


@pytest.mark.slow
def test_duplicate_candidates_are_served_from_the_cache(experiment, tmp_path, monkeypatch):
    # Weights in [0.5, 0.500001], rounded to 6 decimals: four recipes in all.
    space = {"methods": ["task_arithmetic"], "search": {"weight": {"bounds": [0.5, 0.500001]}}}
    config = write_config(experiment, space=space, budget={"trials": 8}, driver={"name": "random"})
    run = Run(config, tmp_path / "run", progress=False)
    scored = []
    real = run.worker.dev.score
    monkeypatch.setattr(run.worker.dev, "score", lambda model, **kw: scored.append(1) or real(model, **kw))
    try:
        run.search()
    finally:
        run.close()
    search = trials(tmp_path / "run", "search")
    cached = [t for t in search if t.user_attrs.get("cached")]
    assert len(search) == 8 and cached
    # each distinct recipe was scored once: the 7 baselines, then the new search recipes
    assert len(scored) == 7 + len(search) - len(cached)
    assert len(search) - len(cached) == len({t.user_attrs["fingerprint"] for t in search})
    for t in cached:
        first = next(
            s
            for s in search
            if s.user_attrs["fingerprint"] == t.user_attrs["fingerprint"] and not s.user_attrs.get("cached")
        )
        assert t.values == first.values


def _sha256_dir(folder):
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.glob("*.safetensors"))}


@pytest.mark.slow
def test_export_pins_sources_and_re_merges_bit_identically(experiment, tmp_path):
    run_dir = tmp_path / "run"
    config = write_config(experiment, budget={"trials": 4})
    assert main(["search", str(config), "--run-dir", str(run_dir), "--no-progress"]) == 0
    out = tmp_path / "best.yaml"
    assert main(["export", str(run_dir), "--out", str(out), "--merge", str(tmp_path / "m1"), "--no-progress"]) == 0
    data = yaml.safe_load(out.read_text())
    meta = data["metadata"]["evomerge"]
    assert all(s["sha256"] for s in data["sources"])
    assert meta["space_fingerprint"] and meta["versions"]["torch"] and meta["seed"] == 0
    assert meta["dev"]["fitness"] is not None and meta["heldout"]["fitness"] is not None
    # re-merging the exported file with the plain merge command gives the same bytes
    assert main(["merge", str(out), str(tmp_path / "m2"), "--allow-outside-paths", "--no-progress"]) == 0
    first, second = _sha256_dir(tmp_path / "m1"), _sha256_dir(tmp_path / "m2")
    assert first and first == second
    # and the same tensors the search scored in place
    from evomerge.engine.merge import InPlaceMerger
    from evomerge.engine.recipe import Recipe, load_recipe

    recipe = load_recipe(out)
    live = InPlaceMerger(recipe, root=out.parent, allow_outside=True).apply(recipe).state_dict()
    disk = load_file(tmp_path / "m1" / "model.safetensors")
    assert all(torch.equal(live[k], v) for k, v in disk.items())
    assert Recipe.model_validate(data).fingerprint() != ""
    # mergekit format: a config mergekit reads, with the provenance in comments
    mk = tmp_path / "best_mk.yaml"
    assert main(["export", str(run_dir), "--out", str(mk), "--format", "mergekit"]) == 0
    text = mk.read_text()
    assert text.startswith("# evomerge:") and yaml.safe_load(text)["merge_method"] == data["method"]


@pytest.mark.slow
def test_status_prints_baselines_and_top_trials(experiment, tmp_path, capsys):
    run_dir = tmp_path / "run"
    config = write_config(experiment, budget={"trials": 3})
    assert main(["search", str(config), "--run-dir", str(run_dir), "--no-progress"]) == 0
    capsys.readouterr()
    assert main(["status", str(run_dir), "--top", "2"]) == 0
    out = capsys.readouterr().out
    assert "3 search trials" in out and "best baseline" in out
    assert "source expert_a" in out and "ties (density 0.5)" in out
    assert out.count("search (task_arithmetic)") == 2


@pytest.mark.slow
@pytest.mark.parametrize("driver", ["cma", "tpe"])
def test_kill_9_then_resume_loses_no_completed_trial(experiment, tmp_path, driver):

    config = write_config(
        experiment,
        f"kill_{driver}.yaml",
        budget={"trials": 10},
        driver=driver_settings(driver, popsize=4, startup_trials=3),
        eval=slow_eval(experiment),
    )
    run_dir = tmp_path / "run"
    kill_search_after(config, run_dir, 3)
    before = completed(run_dir)
    assert 3 <= sum(1 for t in trials(run_dir, "search")) < 10

    assert main(["search", str(config), "--run-dir", str(run_dir), "--no-progress"]) == 0
    after = completed(run_dir)
    assert all(after[n] == v for n, v in before.items())  # nothing completed was lost
    assert len(trials(run_dir, "search")) == 10  # and the run finished its budget
    assert len(trials(run_dir, "baseline")) == 7  # baselines were not re-run
    study = RunStore.open(run_dir).study
    assert not study.get_trials(states=(optuna.trial.TrialState.RUNNING,))
    if driver == "cma":
        # the resumed strategy re-asked the killed generation, and took its finished candidates from the study
        slots = [(t.user_attrs["cma_generation"], t.user_attrs["cma_index"]) for t in trials(run_dir, "search")]
        assert len(slots) == len(set(slots))


def _fails_cleanly(capsys, argv, fragment):
    assert main(argv) == 2
    # (on a busy machine the command first says how many torch threads it takes)
    err = "\n".join(line for line in capsys.readouterr().err.strip().splitlines() if "other work keeps" not in line)
    assert len(err.splitlines()) == 1 and fragment in err, err


@pytest.mark.parametrize(
    "overrides, fragment",
    [
        ({"eval": {"include_path": "tasks", "objectives": [{"task": "nope", "metric": "acc"}]}}, "nope"),
        ({"eval": {"include_path": "tasks", "objectives": [{"task": "sums", "metric": "f1"}]}}, "f1"),
        ({"space": {"methods": ["ties"], "search": {"weight": {"bounds": [0.7, 0.2]}, "density": None}}}, "reversed"),
        ({"space": {"methods": ["ties"], "search": {"weight": {"bounds": [0.3, 0.3]}, "density": None}}}, "empty"),
        ({"base_model": None}, "needs a base model"),
        ({"space": {"methods": ["slerp"], "search": {"t": {"per": "gradient", "points": 9}}}}, "exceed"),
        ({"driver": {"name": "annealing"}}, "driver.name"),
        ({"executor": {"name": "dask"}}, "executor.name"),
        ({"executor": {"name": "ray", "workers": 0}}, "executor.workers"),
        ({"models": ["models/missing"]}, "neither a local folder"),
        ({"models": ["OUTSIDE", "models/expert_b"]}, "outside"),
        ({"device": "cpu,gpu"}, "unknown device 'gpu'"),
    ],
)
def test_bad_search_configs_fail_before_anything_is_written(experiment, tmp_path, capsys, overrides, fragment):
    if overrides.get("models", [""])[0] == "OUTSIDE":
        import shutil

        outside = experiment.parent / "outside_model"
        if not outside.exists():
            shutil.copytree(experiment / "models" / "expert_a", outside)
        overrides = {**overrides, "models": ["../outside_model", "models/expert_b"]}
    config = write_config(experiment, "bad.yaml", **overrides)
    run_dir = tmp_path / "run"
    _fails_cleanly(capsys, ["search", str(config), "--run-dir", str(run_dir)], fragment)
    assert not run_dir.exists()


def test_an_unreadable_config_is_refused(experiment, tmp_path, capsys):
    bad = experiment / "broken.yaml"
    bad.write_text("models: [a, b\nspace: {")
    _fails_cleanly(capsys, ["search", str(bad), "--run-dir", str(tmp_path / "r")], "cannot be read")
    bad.write_bytes(b"\xff\xfe\x00binary")
    _fails_cleanly(capsys, ["search", str(bad), "--run-dir", str(tmp_path / "r")], "cannot be read")
    _fails_cleanly(
        capsys, ["search", str(experiment / "none.yaml"), "--run-dir", str(tmp_path / "r")], "does not exist"
    )
    assert not (tmp_path / "r").exists()


def test_test_splits_need_a_flag(experiment, tmp_path, capsys):
    task = yaml.safe_load((experiment / "tasks" / "sums.yaml").read_text())
    data = task.pop("validation_split") and task["dataset_kwargs"]["data_files"].pop("validation")
    task.update(task="sums_test", test_split="test", dataset_kwargs={"data_files": {"test": data}})
    (experiment / "tasks" / "sums_test.yaml").write_text(yaml.safe_dump(task))
    config = write_config(
        experiment,
        "test_split.yaml",
        eval={"include_path": "tasks", "objectives": [{"task": "sums_test", "metric": "acc"}]},
    )
    _fails_cleanly(capsys, ["search", str(config), "--run-dir", str(tmp_path / "r")], "--allow-test-sets")
    assert not (tmp_path / "r").exists()


@pytest.mark.slow
def test_a_run_folder_of_another_config_is_refused_unless_forced(experiment, tmp_path, capsys):
    run_dir = tmp_path / "run"
    first = write_config(experiment, "first.yaml", budget={"trials": 2})
    assert main(["search", str(first), "--run-dir", str(run_dir), "--no-progress"]) == 0
    before = (run_dir / "study.db").read_bytes()
    other = write_config(experiment, "other.yaml", budget={"trials": 2}, seed=1)
    _fails_cleanly(capsys, ["search", str(other), "--run-dir", str(run_dir), "--no-progress"], "--force")
    assert (run_dir / "study.db").read_bytes() == before
    assert main(["search", str(other), "--run-dir", str(run_dir), "--no-progress", "--force"]) == 0
    assert yaml.safe_load((run_dir / "run.yaml").read_text())["config"]["seed"] == 1
    # a larger budget on the same config is the same experiment: it continues
    more = write_config(experiment, "other.yaml", budget={"trials": 3}, seed=1)
    assert main(["search", str(more), "--run-dir", str(run_dir), "--no-progress"]) == 0
    assert len(trials(run_dir, "search")) == 3


@pytest.mark.slow
def test_cma_restarts_with_a_larger_population_when_it_converges(experiment, tmp_path, capsys):
    # Every point of this space is one of four recipes, so CMA-ES sees flat
    # fitness and converges at once; IPOP restarts keep it searching.
    space = {"methods": ["task_arithmetic"], "search": {"weight": {"bounds": [0.5, 0.500001]}}}
    config = write_config(
        experiment, "ipop.yaml", space=space, budget={"trials": 14}, driver={"name": "cma", "popsize": 4}
    )
    assert main(["search", str(config), "--run-dir", str(tmp_path / "run"), "--no-progress"]) == 0
    search = trials(tmp_path / "run", "search")
    assert len(search) == 14
    restarts = {int(t.user_attrs["cma_generation"].split(":")[0]) for t in search}
    assert max(restarts) >= 1 and "converged" not in capsys.readouterr().err
    # with no restarts allowed, it stops early and says so
    config = write_config(
        experiment,
        "no_ipop.yaml",
        space=space,
        budget={"trials": 14},
        driver={"name": "cma", "popsize": 4, "restarts": 0},
    )
    assert main(["search", str(config), "--run-dir", str(tmp_path / "run0"), "--no-progress"]) == 0
    assert len(trials(tmp_path / "run0", "search")) < 14
    assert "converged" in capsys.readouterr().err


@pytest.mark.slow
def test_ctrl_c_marks_the_candidate_being_scored_and_the_run_resumes(experiment, tmp_path, monkeypatch):
    config = write_config(experiment, "ctrl_c.yaml", driver={"name": "tpe", "startup_trials": 2})
    run_dir = tmp_path / "run"
    run = Run(config, run_dir, progress=False)
    real = run.worker.score
    calls = []

    def interrupted_third(recipe, which="dev"):
        calls.append(which)
        if len(calls) == 3:
            raise KeyboardInterrupt  # Ctrl-C while the third search candidate is scored
        return real(recipe, which)

    try:
        run.run_baselines()
        monkeypatch.setattr(run.worker, "score", interrupted_third)
        with pytest.raises(KeyboardInterrupt):
            run.search()
    finally:
        run.close()
    study = RunStore.open(run_dir).study
    states = [t.state for t in study.get_trials() if t.user_attrs.get("kind") != "baseline"]
    assert states.count(optuna.trial.TrialState.COMPLETE) == 2
    marked = [t for t in study.get_trials() if t.state == optuna.trial.TrialState.FAIL]
    assert len(marked) == 1 and marked[0].user_attrs["status"] == "interrupted"
    assert not study.get_trials(states=(optuna.trial.TrialState.RUNNING,))
    monkeypatch.undo()
    assert main(["search", str(config), "--run-dir", str(run_dir), "--no-progress"]) == 0
    assert len(trials(run_dir, "search")) == 6  # the resumed run finished the budget


@pytest.mark.slow
def test_two_drivers_share_one_study_and_its_budget(experiment, tmp_path):
    config = write_config(
        experiment,
        "shared.yaml",
        budget={"trials": 8},
        driver={"name": "tpe", "startup_trials": 3},
        eval=slow_eval(experiment),
        storage=f"sqlite:///{tmp_path / 'shared.db'}",
    )
    check_two_drivers(config, tmp_path, trials=8)


def _claimer(storage, writes, folder):
    """A stand-in for a Run on a shared storage, enough for the baseline claim."""
    from types import SimpleNamespace

    study = optuna.create_study(storage=storage, study_name="evomerge", load_if_exists=True)
    run = SimpleNamespace(cfg=SimpleNamespace(storage=storage), store=RunStore(folder, {}, study))
    return run, SimpleNamespace(write=writes.append)


def test_one_driver_claims_the_baselines_even_mid_claim(tmp_path, monkeypatch):
    import threading
    import time

    import evomerge.run._shared_storage as store
    from evomerge.run._baselines import baselines_are_mine

    storage = optuna.storages.RDBStorage(f"sqlite:///{tmp_path / 'claim.db'}")
    said = []
    first, bar = _claimer(storage, said, tmp_path)
    assert baselines_are_mine(first, bar)
    second, bar = _claimer(storage, said, tmp_path)
    assert not baselines_are_mine(second, bar)
    assert said == ["another driver runs the baselines"]

    # A claim created but not yet stamped (the claimer is between the two
    # writes) is taken as alive once its stamp comes: the CI race, where both
    # drivers ran all seven baselines.
    optuna.delete_study(study_name="evomerge-baselines", storage=storage)
    claim = optuna.create_study(storage=storage, study_name="evomerge-baselines")
    threading.Timer(0.5, lambda: claim.set_user_attr("alive", time.time())).start()
    assert not baselines_are_mine(second, bar)

    # A claim whose stamp never comes, or one left stale, belongs to a dead driver.
    optuna.delete_study(study_name="evomerge-baselines", storage=storage)
    optuna.create_study(storage=storage, study_name="evomerge-baselines")
    monkeypatch.setattr(store, "CLAIM_STAMP_S", 0.3)
    assert baselines_are_mine(second, bar)
    stale = optuna.load_study(study_name="evomerge-baselines", storage=storage)
    stale.set_user_attr("alive", time.time() - store.CLAIM_EXPIRES_S - 1)
    assert baselines_are_mine(first, bar)


def test_the_heartbeat_keeps_the_baseline_claim_alive(tmp_path):
    # A baseline may take longer than CLAIM_EXPIRES_S on a big model: while
    # the claimer runs them, its heartbeat stamps the claim, and stops after.
    import time

    from evomerge.run.store import Heartbeat

    storage = optuna.storages.RDBStorage(f"sqlite:///{tmp_path / 'beat.db'}")
    study = optuna.create_study(storage=storage, study_name="evomerge")
    claim = optuna.create_study(storage=storage, study_name="evomerge-baselines")
    claim.set_user_attr("alive", 0.0)
    run_store = RunStore(tmp_path, {}, study)
    run_store.claim = claim
    beat = Heartbeat(run_store, {}, every=0.05)
    try:
        time.sleep(0.3)
        assert claim.user_attrs["alive"] == 0.0  # not stamping (no baselines running): nothing stamped
        beat.stamping = True
        time.sleep(0.3)
        beat.stamping = False
        time.sleep(0.2)  # a beat that read the claim just before finishes its write
        stamped = claim.user_attrs["alive"]
        assert time.time() - stamped < 2.0
        time.sleep(0.3)
        assert claim.user_attrs["alive"] == stamped
    finally:
        beat.stop()


@pytest.mark.slow
def test_a_shared_search_keeps_its_baseline_claim_alive_while_scoring_them(experiment, tmp_path, monkeypatch):
    import time

    import evomerge.run._loop as search

    config = write_config(experiment, "claim.yaml", budget={"trials": 1}, storage=f"sqlite:///{tmp_path / 'shared.db'}")
    beat = search.Heartbeat
    monkeypatch.setattr(search, "Heartbeat", lambda store, inflight: beat(store, inflight, every=0.05))
    run = Run(config, tmp_path / "run", progress=False)
    real = run.worker.score
    stamps = []

    def slow_score(recipe, which="dev"):
        claim = optuna.load_study(study_name="evomerge-baselines", storage=run.store.study._storage)
        before = claim.user_attrs["alive"]
        time.sleep(0.3)  # six beats
        stamps.append((before, claim.user_attrs["alive"]))
        return real(recipe, which)

    monkeypatch.setattr(run.worker, "score", slow_score)
    try:
        run.search()
    finally:
        run.close()
    assert len(trials(tmp_path / "run", "baseline")) == 7
    baseline_stamps = stamps[:7]  # the baselines are scored first
    assert all(after > before for before, after in baseline_stamps)  # stamped while each was scored
    assert all(after == before for before, after in stamps[7:])  # and no longer once they were done


def _open_shared_storage(url, queue):
    from evomerge.run._shared_storage import rdb_storage

    try:
        rdb_storage(url, shared=True)
        queue.put("ok")
    except Exception as e:  # noqa: BLE001 - the test reports what went wrong
        queue.put(f"{type(e).__name__}: {e}"[:200])


def test_drivers_starting_together_on_a_new_shared_database(tmp_path):
    # Both create the tables and stamp the schema version; without a retry
    # about a third of such starts failed ("UNIQUE constraint failed:
    # alembic_version"), so 12 pairs all succeeding would be luck.
    import multiprocessing

    import optuna  # noqa: F401 - imported before forking, so both start at once

    ctx = multiprocessing.get_context("fork")
    results = []
    for i in range(6):
        queue = ctx.Queue()
        procs = [
            ctx.Process(target=_open_shared_storage, args=(f"sqlite:///{tmp_path / f'{i}.db'}", queue))
            for _ in range(2)
        ]
        for p in procs:
            p.start()
        for p in procs:
            p.join(60)
        results += [queue.get(timeout=5) for _ in procs]
    assert results == ["ok"] * 12, results
