"""The Ray executor on a local Ray instance with two CPU workers (2 CPUs, and 2 declared GPUs that Ray only counts).

One Ray instance serves the whole module (it starts in seconds and takes
over a GB) and is shut down at the end; each executor starts its own actors
and kills them when it closes.
"""

import dataclasses
import math
import os
import re
import signal
import threading
import time

import pytest
from conftest import N_DOCS
from helpers import ray_config, trials, write_config

from evomerge.engine.recipe import Recipe
from evomerge.errors import EvomergeError
from evomerge.run.executors.worker import Worker
from evomerge.run.run import Run

ray = pytest.importorskip("ray")


@pytest.fixture(scope="module")
def local_ray():
    os.environ["RAY_USAGE_STATS_ENABLED"] = "0"
    ray.init(
        num_cpus=2,
        num_gpus=2,  # declared only: Ray counts them, the workers compute on the CPU
        include_dashboard=False,
        log_to_driver=False,
        _system_config={"enable_metrics_collection": False},
    )
    try:
        yield
    finally:
        ray.shutdown()


@pytest.mark.slow
def test_search_completes_its_budget_when_a_worker_is_killed(experiment, tmp_path, local_ray):
    config = ray_config(experiment, "ray_kill.yaml", budget={"trials": 16}, driver={"name": "tpe", "startup_trials": 3})
    run_dir = tmp_path / "run"
    run = Run(config, run_dir, progress=False)
    assert run.worker is None  # the driver holds no model: the workers do
    seen: dict = {}

    def killer():
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and "killed" not in seen:
            time.sleep(0.05)
            executor = run.executor
            if executor is None or not hasattr(executor, "info"):
                continue
            seen["executor"] = executor
            try:
                done = trials(run_dir, "search")
            except Exception:  # the study is being written
                continue
            pid = executor.info[0]["pid"]
            if len(done) >= 3 and (experiment / "busy" / str(pid)).exists():
                seen["before"] = {t.number: (t.user_attrs["fingerprint"], t.values) for t in done}
                os.kill(pid, signal.SIGKILL)
                seen["killed"] = pid

    thread = threading.Thread(target=killer, daemon=True)
    thread.start()
    try:
        run.search()
    finally:
        run.close()
        thread.join(timeout=5)
    assert "killed" in seen, "the test never found a worker mid-candidate to kill"
    search = trials(run_dir, "search")
    assert len(search) == 16  # the budget was completed
    after = {t.number: (t.user_attrs["fingerprint"], t.values) for t in search}
    assert all(after[n] == v for n, v in seen["before"].items())  # no completed trial was lost
    assert all(t.user_attrs["status"] == "ok" for t in search)
    # the killed worker's candidate ran again, on the other worker
    assert any(t.user_attrs.get("attempts") == 2 for t in search)
    assert len(trials(run_dir, "baseline")) == 7


@pytest.mark.slow
def test_ray_and_local_executors_score_the_same_candidates_the_same(experiment, tmp_path, local_ray):
    from evomerge.run.executors.ray_executor import RayExecutor

    config = write_config(
        experiment,
        "ray_parity.yaml",
        eval={
            "include_path": "tasks",
            "objectives": [
                {"task": "sums", "metric": "acc"},
                {"perplexity": "tasks/sums.jsonl", "weight": 0.01},
            ],
            "batch_size": 32,
        },
    )
    run = Run(config, tmp_path / "run", progress=False)
    try:
        recipes = [recipe for _, recipe in run.baseline_recipes()]
        rng = __import__("random").Random(0)
        recipes += [run.space.decode([rng.random() for _ in range(run.space.dim)]) for _ in range(4)]
        local = [run.worker.score(r, "both") for r in recipes]
    finally:
        run.close()
    settings = run.cfg.executor.model_copy(update={"name": "ray", "workers": 2})
    # The workers split their live model over two devices (the CPU twice:
    # the split path, see tests/engine/test_devices.py) and still score like the
    # local executor's one-device worker.
    split = dataclasses.replace(run.spec, device="cpu,cpu")
    lines = []
    executor = RayExecutor(settings, split, log=lines.append)
    try:
        pids = [info["pid"] for info in executor.info]
        assert len(set(pids)) == 2  # two worker processes
        assert all(info["devices"] == ["cpu", "cpu"] for info in executor.info)
        assert lines[0].startswith("2 Ray workers ready: 0 on ") and lines[0].count("(cpu,cpu)") == 2
        # Both workers planned their memory alike: one line for both.
        assert lines[1].startswith("Ray workers' memory: cached: ") and lines[1].endswith("chosen by memory: auto")
        results = {}
        queue = list(enumerate(recipes))
        while queue or executor.pending():
            while queue and executor.free():
                executor.submit(*queue.pop(0), "both")
            for key, result in executor.wait():
                results[key] = result

        # A killed worker is restarted and takes candidates again.
        executor.submit("a", recipes[0], "dev")
        executor.submit("b", recipes[1], "dev")
        os.kill(pids[0], signal.SIGKILL)
        again = {}
        # A hang guard, not a timing target: a restart reloads torch, the
        # sources and the tasks, which took over 180 s on 2 cores shared with
        # two other jobs.
        deadline = time.monotonic() + 600
        while executor.restarts < 1 or executor.pending():
            assert time.monotonic() < deadline, "the killed worker did not come back in 600 s"
            while executor.restarts < 1 and executor.free():
                executor.submit(f"more{len(again)}", recipes[2], "dev")
            for key, result in executor.wait():
                again[key] = result
        assert {"a", "b"} <= set(again) and all(r.status == "ok" for r in again.values())
        new = executor.pids()
        assert new[0] != pids[0] and new[1] == pids[1]
        assert executor.free() == 2 * (1 + settings.prefetch)  # both back in the pool
    finally:
        executor.close()
    assert sorted(results) == list(range(len(recipes)))
    for i, mine in enumerate(local):
        theirs = results[i]
        assert theirs.status == mine.status == "ok"
        for part in ("values", "heldout"):
            a = mine.values if part == "values" else mine.heldout.values
            b = theirs.values if part == "values" else theirs.heldout.values
            assert a.keys() == b.keys()
            for name in a:  # accuracies equal; perplexities up to the float sums' thread count
                assert math.isclose(a[name], b[name], rel_tol=1e-5), (i, name, a[name], b[name])
    # the candidates really differ, so equal scores are not a coincidence
    assert len({round(r.values["perplexity:tasks/sums.jsonl"], 6) for r in local}) > len(local) // 2


@pytest.mark.slow
def test_a_worker_with_different_sources_refuses_to_score(experiment, tmp_path, local_ray):
    import dataclasses

    from evomerge.run.executors.ray_executor import RayExecutor

    run = Run(write_config(experiment, "ray_sha.yaml"), tmp_path / "run", progress=False)
    run.close()
    wrong = {ref: {name: "0" * 64 for name in files} for ref, files in run.spec.sha256.items()} or None
    assert wrong is None  # a local run does not hash its sources
    from evomerge.run.executors.worker import source_digests

    digests = source_digests(["models/base", "models/expert_a", "models/expert_b"], experiment, False)
    digests["models/expert_b"] = {name: "0" * 64 for name in digests["models/expert_b"]}
    spec = dataclasses.replace(run.spec, sha256=digests)
    with pytest.raises(EvomergeError, match=r"sha256 of models/expert_b/.*put the same model on every node"):
        Worker(spec)  # the same check a Ray worker makes at start
    settings = run.cfg.executor.model_copy(update={"name": "ray", "workers": 1})
    with pytest.raises(EvomergeError, match=r"^worker on .*sha256 of models/expert_b"):
        RayExecutor(settings, spec, log=lambda _: None)
    # A worker whose memory plan does not fit its device says so, in one line.
    tight = dataclasses.replace(run.spec, config={**run.spec.config, "memory": {"budget": 1000}})
    with pytest.raises(EvomergeError, match=r"^worker on .*: the in-place merge does not fit: even lean: .* kB on cpu"):
        RayExecutor(settings, tight, log=lambda _: None)
    # A worker larger than any node is refused at once (the local instance
    # has 2 CPUs and 2 declared GPUs), not waited for until the start timeout.
    for change, words in [
        ({"num_gpus": 3.0}, "executor.num_gpus is 3 per worker, but no node of the Ray cluster has more than 2;"),
        ({"num_cpus": 3.0}, "executor.num_cpus is 3 per worker, but no node of the Ray cluster has more than 2;"),
    ]:
        with pytest.raises(EvomergeError, match="^" + re.escape(words)):
            RayExecutor(settings.model_copy(update=change), spec, log=lambda _: None)


@pytest.mark.slow
def test_a_worker_with_several_gpus_holds_them_in_a_placement_group_and_splits_its_model(
    experiment, tmp_path, local_ray
):
    """The module's Ray instance declares 2 GPUs that do not exist: Ray
    reserves them, and the worker, told to split over the CPU twice, scores
    like the local worker. Left to choose, it splits over all its GPUs and,
    finding no CUDA here, says so."""
    from ray.util.placement_group import placement_group_table

    from evomerge.run.executors.ray_executor import RayExecutor

    run = Run(write_config(experiment, "ray_pg.yaml"), tmp_path / "run", progress=False)
    try:
        recipes = [recipe for _, recipe in run.baseline_recipes()][:3]
        local = [run.worker.score(r, "dev") for r in recipes]
    finally:
        run.close()
    memory = 256 * 2**20
    settings = run.cfg.executor.model_copy(
        update={"name": "ray", "workers": 1, "num_gpus": 2.0, "num_cpus": 1.0, "memory": memory}
    )
    executor = RayExecutor(settings, dataclasses.replace(run.spec, device="cpu,cpu"), log=lambda _: None)
    try:
        (info,) = executor.info
        assert sorted(info["gpus"]) == ["0", "1"] and info["devices"] == ["cpu", "cpu"]
        (group,) = executor._groups
        table = placement_group_table(group)
        assert table["state"] == "CREATED" and table["strategy"] == "STRICT_PACK"
        assert table["bundles"] == {0: {"GPU": 2.0, "CPU": 1.0, "memory": float(memory)}}
        for i, r in enumerate(recipes):
            executor.submit(i, r, "dev")
        results = {}
        while executor.pending():
            results.update(executor.wait())
    finally:
        executor.close()
    assert placement_group_table(group)["state"] == "REMOVED"
    for i, mine in enumerate(local):
        assert results[i].status == mine.status == "ok"
        assert results[i].values == pytest.approx(mine.values, rel=1e-6)
    with pytest.raises(EvomergeError, match=r"^worker on .*cuda:all was given but no CUDA GPU is available"):
        RayExecutor(settings, run.spec, log=lambda _: None)


@pytest.mark.slow
def test_a_killed_driver_leaves_its_ray_instance_to_the_next_search_in_its_folder(experiment, tmp_path):
    # The driver starts Ray itself (a process of its own, not this module's
    # instance); after kill -9 its Ray processes are recorded in the run
    # folder, and the next search there ends exactly those.
    import json
    import subprocess
    import sys

    import psutil

    config = ray_config(experiment, "ray_reap.yaml", budget={"trials": 40}, executor={"name": "ray", "workers": 1})
    run_dir = tmp_path / "run"
    cmd = [sys.executable, "-m", "evomerge", "search", str(config), "--run-dir", str(run_dir), "--no-progress"]
    record = run_dir / "ray_instance.json"
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 300
        while not record.is_file() and time.monotonic() < deadline:
            assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
            time.sleep(0.5)
        assert record.is_file(), "the driver never recorded its Ray instance"
        left = json.loads(record.read_text())
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    finally:
        if proc.poll() is None:
            proc.kill()
    assert any(entry["name"].startswith(("raylet", "gcs_server")) for entry in left)

    def alive():
        out = []
        for entry in left:
            try:
                if abs(psutil.Process(entry["pid"]).create_time() - entry["created"]) < 0.01:
                    out.append(entry["pid"])
            except psutil.Error:
                pass
        return out

    assert alive()  # kill -9 left them running
    again = subprocess.run(
        [*cmd[:-1], "--no-progress"], capture_output=True, text=True, timeout=900, env={**os.environ, "CI": "1"}
    )
    assert again.returncode == 0, again.stderr[-2000:]
    assert "processes of the Ray instance that a stopped driver of this run left running" in again.stdout + again.stderr
    assert alive() == [] and not record.exists()  # ended, and the rerun shut down its own instance


@pytest.mark.slow
def test_selection_race_and_early_stopping_run_on_ray_workers(experiment, tmp_path, local_ray):
    from evomerge.run.store import RunStore

    config = write_config(
        experiment,
        "ray_select.yaml",
        eval={
            "include_path": "tasks",
            "objectives": [{"task": "sums", "metric": "acc"}],
            "batch_size": 32,
            "samples": 20,
        },
        select={"top": 3, "min_docs": 2},
        early_stop={"enabled": True, "alpha": 0.45, "looks": [0.25, 0.5], "min_docs": 2},
        driver={"name": "random"},
        budget={"trials": 10},
        executor={"name": "ray", "workers": 2, "num_cpus": 1},
    )
    run = Run(config, tmp_path / "run", progress=False)
    try:
        best = run.search()
    finally:
        run.close()
    store = RunStore.open(tmp_path / "run")
    race = store.race()
    assert race["winner"] == best.number and len(race["rounds"]) >= 2
    scored = store.selections(race["fp"])
    assert set(race["entrants"]) <= set(scored) and all("docs" in e for e in scored.values())
    search = [r for r in store.trials("search") if not r.cached]
    assert all(len(r.docs["sums/acc"]) == r.documents for r in search)

    # The workers take the job's part and its incumbent: against a perfect
    # incumbent, a candidate stops at the first look.
    from evomerge.fitness.score import Versus
    from evomerge.run.executors.ray_executor import RayExecutor
    from evomerge.run.executors.worker import Job

    executor = RayExecutor(run.cfg.executor, run.spec, log=lambda line: None)
    recipe = Recipe.model_validate(store.trial(best.number).recipe)
    perfect = Versus({"sums/acc": [1.0] * 20}, alpha=0.05, looks=(0.5,), min_docs=4)
    try:
        executor.submit("stop", recipe, Job("dev", versus=perfect))
        executor.submit("part", recipe, Job("select", part={"sums": (1, 3)}))
        got = {}
        while executor.pending():
            got.update(executor.wait())
    finally:
        executor.close()
    assert got["stop"].stopped and got["stop"].documents == 10
    assert len(got["part"].docs["sums/acc"]) == 2 and got["part"].documents == 2
    assert got["part"].docs["sums/acc"] == scored[best.number]["docs"]["sums/acc"][1:3]


from executor_contract import ExecutorContract  # noqa: E402


@pytest.mark.usefixtures("local_ray")
class TestRayExecutorContract(ExecutorContract):
    executor_settings = {"name": "ray", "workers": 2, "num_cpus": 1, "retries": 1}


@pytest.mark.slow
def test_a_fidelity_search_runs_on_ray_workers(experiment, tmp_path, local_ray):
    from evomerge.fitness.estimate import Rungs
    from evomerge.run.executors.ray_executor import RayExecutor
    from evomerge.run.executors.worker import Job
    from evomerge.run.store import RunStore

    config = write_config(
        experiment,
        "ray_fidelity.yaml",
        fidelity={"enabled": True, "rungs": [0.25, 0.5], "z": 0.0, "min_docs": 2},
        driver={"name": "random"},
        budget={"trials": 8},
        executor={"name": "ray", "workers": 2, "num_cpus": 1},
    )
    run = Run(config, tmp_path / "run", progress=False)
    try:
        best = run.search()
    finally:
        run.close()
    store = RunStore.open(tmp_path / "run")
    search = [r for r in store.trials("search") if r.ok and not r.cached]
    stopped = [r for r in search if r.stopped]
    assert len(search) >= 6 and stopped and best.complete
    assert all(len(r.positions["sums"]) == len(r.docs["sums/acc"]) == r.documents < N_DOCS for r in stopped)

    # The workers take the job's rungs: against a best no candidate reaches, it stops at the first.
    executor = RayExecutor(run.cfg.executor, run.spec, log=lambda line: None)
    rungs = Rungs(
        key="k", seed=0, predicted={"sums/acc": [0.5] * N_DOCS}, axes=[{"sums/acc": 1.0}], front=[[2.0]], min_docs=2
    )
    try:
        executor.submit("stop", Recipe.model_validate(best.recipe), Job("dev", rungs=rungs))
        got = dict(executor.wait())
    finally:
        executor.close()
    assert got["stop"].stopped and got["stop"].positions["sums"] == rungs.order("sums", N_DOCS)[: N_DOCS // 8]
