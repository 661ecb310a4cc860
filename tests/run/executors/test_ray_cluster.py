"""The Ray executor on several Ray nodes on this machine (Ray's own
multi-node harness, ``ray.cluster_utils.Cluster``: a head and worker nodes,
each its own raylet, one CPU and so one evomerge worker each): a search
over three nodes, a whole node removed mid-search as a pre-emption would
and another added later, a replacement node without the sources, and the
driver killed with -9 while the worker nodes live on.

Each test has its own cluster (it starts in about 5 s); its searches connect
to it by address (``executor.address``) and leave it running.
"""

import os
import threading
import time

import optuna
import psutil
import pytest
from helpers import completed, kill_search_after, ray_config, trials

from evomerge.app.cli import main
from evomerge.run.run import Run
from evomerge.run.store import RunStore

ray = pytest.importorskip("ray")
from ray.cluster_utils import Cluster  # noqa: E402

pytestmark = pytest.mark.slow


@pytest.fixture
def cluster():
    os.environ["RAY_USAGE_STATS_ENABLED"] = "0"
    c = Cluster(initialize_head=True, head_node_args={"num_cpus": 1})
    try:
        for _ in range(2):
            c.add_node(num_cpus=1)
        c.wait_for_nodes()
        yield c
    finally:
        c.shutdown()


def _config(experiment, cluster, name, **overrides):
    executor = {"name": "ray", "address": cluster.address, "workers": 3, "num_cpus": 1, "retries": 2}
    driver = {"name": "tpe", "startup_trials": 3}
    return ray_config(experiment, name, busy_s=0.8, executor=executor, driver=driver, **overrides)


def _actor_on(node, pids) -> int | None:
    """The worker (of ``pids``) whose process runs under ``node``'s raylet."""
    raylet = psutil.Process(node.all_processes["raylet"][0].process.pid)
    children = {p.pid for p in raylet.children(recursive=True)}
    return next((pid for pid in pids if pid in children), None)


def _search_in_thread(run, monkeypatch) -> tuple[threading.Thread, list, dict]:
    """Start ``run``'s search in a thread (Ray adds nodes from the main
    thread only, which the test keeps); return it, the workers' timeline
    (filled when the search closes its executor) and a dict that holds the
    search's error, if any."""
    from evomerge.run.executors.ray_executor import RayExecutor

    timeline, real_close, seen = [], RayExecutor.close, {}

    def close(self):  # the search closes its executor at the end: keep what it saw
        timeline.extend(getattr(self, "timeline", []))
        real_close(self)

    monkeypatch.setattr(RayExecutor, "close", close)

    def search():
        try:
            run.search()
        except BaseException as e:  # noqa: BLE001 - reported by the test
            seen["error"] = e
        finally:
            run.close()

    thread = threading.Thread(target=search, daemon=True)
    thread.start()
    return thread, timeline, seen


def test_a_search_loses_a_node_mid_candidate_and_a_node_added_later_gets_work(
    experiment, cluster, tmp_path, capsys, monkeypatch
):
    config = _config(experiment, cluster, "nodes_lost.yaml", budget={"trials": 40})
    run_dir = tmp_path / "run"
    run = Run(config, run_dir, progress=False)
    thread, timeline, seen = _search_in_thread(run, monkeypatch)
    deadline = time.monotonic() + 300
    while thread.is_alive() and time.monotonic() < deadline and "added" not in seen:
        time.sleep(0.05)
        executor = run.executor
        if executor is None or not hasattr(executor, "info"):
            continue
        try:
            done = trials(run_dir, "search")
        except Exception:  # noqa: BLE001 - the study is being written
            continue
        if "removed" not in seen:
            node = next(iter(cluster.worker_nodes))
            pid = _actor_on(node, [x["pid"] for x in executor.info])
            if len(done) >= 3 and pid is not None and (experiment / "busy" / str(pid)).exists():
                seen["before"] = {t.number: (t.user_attrs["fingerprint"], t.values) for t in done}
                seen["index"] = [x["pid"] for x in executor.info].index(pid)
                cluster.remove_node(node)  # its raylet and every process under it, mid-candidate
                seen["removed"] = len(done)
        elif len(done) >= seen["removed"] + 1:  # the search went on on two nodes
            seen["added_at"] = time.time()
            cluster.add_node(num_cpus=1)
            seen["added"] = len(done)
    thread.join(timeout=300)
    assert "error" not in seen, seen.get("error")
    out = capsys.readouterr().out
    assert "removed" in seen, "the test never found the node's worker mid-candidate"
    search = trials(run_dir, "search")
    assert len(search) == 40 and all(t.user_attrs["status"] == "ok" for t in search)  # the budget, on what was left
    after = {t.number: (t.user_attrs["fingerprint"], t.values) for t in search}
    assert all(after[n] == v for n, v in seen["before"].items())  # no completed trial lost
    assert any(t.user_attrs.get("attempts") == 2 for t in search)  # the lost candidate, re-queued and scored
    assert f"worker {seen['index']} died" in out and "retrying its candidate" in out
    # the lost worker restarted on the node added later and scored candidates there
    assert "added" in seen and f"worker {seen['index']} restarted" in out, out[-3000:]
    assert any(i == seen["index"] and start > seen["added_at"] for i, start, _ in timeline), (
        seen["added_at"],
        [(i, s) for i, s, _ in timeline if i == seen["index"]][-5:],
        len(timeline),
        out[-1500:],
    )


def test_a_driver_killed_while_its_worker_nodes_live_resumes_without_scoring_a_trial_twice(
    experiment, cluster, tmp_path
):
    config = _config(experiment, cluster, "driver_killed.yaml", budget={"trials": 10})
    run_dir = tmp_path / "run"
    kill_search_after(config, run_dir, 3, timeout=300)
    before = completed(run_dir)
    # the worker nodes live on without their driver
    assert len(cluster.list_all_nodes()) == 3 and all(n.remaining_processes_alive() for n in cluster.list_all_nodes())

    assert main(["search", str(config), "--run-dir", str(run_dir), "--no-progress"]) == 0
    search = trials(run_dir, "search")
    after = completed(run_dir)
    assert all(after[n] == v for n, v in before.items())  # nothing completed lost
    assert len(search) == 10  # the budget, each trial once
    assert len(trials(run_dir, "baseline")) == 7
    study = RunStore.open(run_dir).study
    assert not study.get_trials(states=(optuna.trial.TrialState.RUNNING,))


def test_a_worker_restarted_on_a_node_without_the_sources_never_takes_a_candidate(
    experiment, cluster, tmp_path, capsys, monkeypatch
):
    """A node lost, and the node that replaces it lacks a source file (on
    one machine: the file is moved away once the first workers hold their
    sources in memory): the worker restarted there says so in one line,
    naming the path, leaves the pool, and the search finishes on the others."""
    config = _config(experiment, cluster, "node_without_files.yaml", budget={"trials": 24})
    run_dir = tmp_path / "run"
    run = Run(config, run_dir, progress=False)
    weights = next((experiment / "models" / "expert_b").glob("*.safetensors"))
    hidden = tmp_path / "hidden.safetensors"
    thread, timeline, seen = _search_in_thread(run, monkeypatch)
    try:
        deadline = time.monotonic() + 300
        while thread.is_alive() and time.monotonic() < deadline and "added" not in seen:
            time.sleep(0.05)
            executor = run.executor
            if executor is None or not hasattr(executor, "info"):
                continue
            try:
                done = trials(run_dir, "search")
            except Exception:  # noqa: BLE001 - the study is being written
                continue
            if len(done) >= 3:
                node = next(iter(cluster.worker_nodes))
                pids = [x["pid"] for x in executor.info]
                seen["index"] = pids.index(_actor_on(node, pids))
                weights.rename(hidden)  # the replacement node will not have it
                cluster.remove_node(node)
                seen["added_at"] = time.time()
                cluster.add_node(num_cpus=1)
                seen["added"] = True
        thread.join(timeout=300)
    finally:
        if hidden.exists():
            hidden.rename(weights)
    assert "error" not in seen, seen.get("error")
    out = capsys.readouterr().out
    line = next((x for x in out.splitlines() if f"worker {seen['index']} restarted" in x), None)
    assert line is not None and "cannot score" in line and "expert_b" in line, out[-2000:]
    assert len(trials(run_dir, "search")) == 24  # finished on the other two
    assert not any(i == seen["index"] and start > seen["added_at"] for i, start, _ in timeline)
