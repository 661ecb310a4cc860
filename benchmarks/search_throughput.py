"""Search throughput: evomerge's candidates per hour against the loop a user
writes without it (mergekit-yaml, then lm_eval, per candidate).

In one run on one machine, for each model size (a tiny Llama, and a randomly
initialised Llama shaped like SmolLM2-135M; on a GPU also one shaped like
SmolLM2-360M, size 360m), with a base and two stand-in
fine-tunes and one local multiple-choice lm-eval task of --docs documents,
this measures:

  1. evomerge: `Run(config).search()` with the `task_arithmetic_layerwise`
     space, no baselines, a budget of --trials candidates (driver: random, or
     cma with IPOP restarts), in a fresh process per size. Time per candidate is the wall time of `search()` divided by
     the candidates; process start and `Run` construction are reported apart
     (startup s). The median of the trials' own `seconds` (merge plus score)
     and the first trial's (which builds the resident caches, and for the
     large model compiles the fused merge kernel) are shown too.
  2. the loop without evomerge: per candidate, write a mergekit
     task_arithmetic config with random per-layer weights, run
     `mergekit-yaml` to a folder, then `lm_eval` on it, each as a subprocess;
     --baseline-candidates of them, end to end, wall clock (--no-loop skips
     it, for a machine without mergekit).
  3. where evomerge's candidate time goes: time inside the live model's
     forward calls (pre/post forward hooks on the top-level module) and inside
     `InPlaceMerger.apply`, per candidate; overhead share is
     (candidate time - forward time) / candidate time. The steady state
     starts at the second candidate's merge and runs to the end of the search
     (so it leaves out the first candidate's one-off costs, but keeps the
     driver's and the study's time between trials).

  4. routed candidates (layer routing, data-flow merges), with --routing (on
     by default), in a fresh process per size: the three models loaded live
     into a `Router`, then `Router.assemble` timed on --routing-routes random
     routes (median; mixed models, depth between the sources' and twice it,
     input scales in [0.7, 1.4], layers repeated), and `Evaluator.score` of
     routed candidates on the same task (median over --routing-candidates,
     after one warm-up candidate that builds lm-eval's wrapper). The share
     reported is assemble time / evaluation time.
     --routing-only measures this alone (no search, no loop).

  5. executors, with --executors (alone: no search or loop above): the Ray
     executor on a local Ray instance, 1 worker against 2, on the tiny
     models, with a custom objective that sleeps --sleep seconds, so that
     scheduling is all that differs. For each driver of --executor-drivers
     (tpe: asynchronous asks; cma: a population shared by the workers),
     --executor-trials candidates. Times come from the workers' own clocks:
     the span is from the first candidate's start to the last one's end
     (worker start-up excluded); a worker's gaps between two of its
     candidates are its idle time while candidates were pending, and their
     mean is the scheduling overhead per candidate. Speed-up is the 1-worker
     span over the 2-worker span.

  6. several nodes, with --nodes N (alone): N Ray nodes of one CPU each on
     this machine (ray.cluster_utils.Cluster: a head and N-1 nodes, each its
     own raylet), the same sleeping objective, TPE, --executor-trials
     candidates: one worker against one per node (speed-up and idle gaps from
     the workers' clocks), then one per node with a node removed (its raylet
     and its workers killed, as a pre-emption would) once a third of the
     budget is scored: trials lost (completed trials missing afterwards,
     target 0), how long after the removal the executor re-queued the lost
     candidate, how many candidates were retried, and the wall time against
     the same run without the loss.

Torch keeps its default threads (one per core) unless --threads sets
OMP_NUM_THREADS for every timed process. On a shared machine, threads that
wait for a busy core can make small models' forward passes many times slower;
the header line shows the load average before the run.

Targets: at least 20x the candidates per hour of the plain loop on the tiny
models, at most 10% overhead on the ~135M model, routed-candidate assembly
under 1% of a routed candidate's evaluation time on every size, and for the
executors a speed-up of at least 1.8x from 1 to 2 workers with at most 20 ms
of scheduling overhead per candidate.

Usage:
    .venv/bin/python benchmarks/search_throughput.py [--sizes tiny,135m] [--trials 40] [--large-trials 5]
        [--baseline-candidates 3 | --no-loop] [--docs 100] [--driver random] [--threads N] [--json runs/bench/throughput.json]
        [--no-routing | --routing-only] [--routing-routes 200] [--routing-candidates 5]
        [--large-routing-candidates 2]
    .venv/bin/python benchmarks/search_throughput.py --executors [--sleep 0.5] [--executor-trials 40]
        [--executor-drivers tpe,cma]

Results go to stdout as a markdown table (copy it into docs/benchmarks.md)
and to --json if given. Model folders are cached under --workdir.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402
import yaml  # noqa: E402

from evomerge.app.demo.tiny import make_finetune, make_tiny_model  # noqa: E402
from evomerge.fitness.evaluate import write_choice_task  # noqa: E402

SIZES = {
    # name: config overrides for evomerge.app.demo.tiny.tiny_config
    "tiny": dict(layers=4, hidden=64),
    # SmolLM2-135M's shape; the byte-level demo tokenizer uses only 260 of the
    # 49152 embedding rows, which changes nothing for timing.
    "135m": dict(
        layers=30,
        hidden=576,
        intermediate_size=1536,
        num_attention_heads=9,
        num_key_value_heads=3,
        vocab_size=49152,
        max_position_embeddings=2048,
        tie=True,
    ),
    # SmolLM2-360M's shape, for a GPU machine.
    "360m": dict(
        layers=32,
        hidden=960,
        intermediate_size=2560,
        num_attention_heads=15,
        num_key_value_heads=5,
        vocab_size=49152,
        max_position_embeddings=2048,
        tie=True,
    ),
}
LARGE = {"135m", "360m"}  # sizes that use --large-trials and --large-docs
TASK = "sums"
BATCH_SIZE = 32
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"  # for both evomerge and the loop


def sync() -> None:
    """Wait for the GPU's queued work, so that a timer stops when it is done."""
    if DEVICE == "cuda":
        torch.cuda.synchronize()


TARGET_SPEEDUP = 20.0  # tiny: evomerge candidates/hour over the plain loop's
TARGET_OVERHEAD = 0.10  # 135m: share of candidate time outside forward passes
TARGET_ROUTING = 0.01  # every size: Router.assemble time / routed candidate evaluation time
EXPERTS = ("base", "expert_a", "expert_b")  # the models built per size, all routing sources


def build_experiment(workdir: Path, size: str, docs: int, trials: int, driver: str) -> Path:
    """Models (cached), the task (docs documents) and the search config; returns the config folder."""
    root = workdir / f"throughput-{size}"
    models = root / "models"
    if not (models / "expert_b" / "config.json").is_file():
        print(f"building {size} models in {models} ...", file=sys.stderr)
        shutil.rmtree(models, ignore_errors=True)
        base = make_tiny_model(models / "base", arch="llama", seed=0, **SIZES[size])
        make_finetune(base, models / "expert_a", seed=1)
        make_finetune(base, models / "expert_b", seed=2)
    rng = random.Random(0)
    items = []
    while len(items) < docs:
        a, b = rng.randint(0, 99), rng.randint(0, 99)
        choices = [f" {a + b}", f" {a + b + 1}", f" {a * b + 3}", f" {abs(a - b) + 2}"]
        if len(set(choices)) < len(choices):
            continue  # e.g. 0+3 = 0*3+3: keep the answer unique
        rng.shuffle(choices)
        items.append({"q": f"{a}+{b}=", "choices": choices, "label": choices.index(f" {a + b}")})
    write_choice_task(root / "tasks", TASK, items)
    config = {
        "base_model": "models/base",
        "models": ["models/expert_a", "models/expert_b"],
        "space": "task_arithmetic_layerwise",
        "eval": {"include_path": "tasks", "objectives": [{"task": TASK, "metric": "acc"}], "batch_size": BATCH_SIZE},
        "budget": {"trials": trials},
        # pycma stops once a generation's fitness is flat (tolfun), which these
        # near-identical models give; restarts keep it going to the budget.
        "driver": {"name": driver, **({"restarts": 9} if driver == "cma" else {})},
        "baselines": False,
        "dtype": "float32",
        "device": DEVICE,
        "seed": 0,
    }
    (root / "search.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    return root


def bench_search(root: Path, launched: float) -> dict:
    """Run the search with timing hooks (in its own process); ``launched`` is
    the parent's time.time() when it started this process."""
    from evomerge.run.run import Run
    from evomerge.run.store import RunStore

    run_dir = root / "run"
    shutil.rmtree(run_dir, ignore_errors=True)
    t = time.perf_counter()
    run = Run(root / "search.yaml", run_dir, progress=False)
    construct_s = time.perf_counter() - t
    startup_s = time.time() - launched
    starts: list[float] = []  # when each candidate's merge began
    merges: list[float] = []  # seconds in InPlaceMerger.apply, per candidate
    forwards: list[float] = []  # seconds in the live model's forward calls, per candidate
    calls = [0]
    started = [0.0]
    apply = run.worker.merger.apply

    def timed_apply(recipe):
        t0 = time.perf_counter()
        starts.append(t0)
        out = apply(recipe)
        sync()
        merges.append(time.perf_counter() - t0)
        forwards.append(0.0)
        return out

    def pre(module, args, kwargs):
        started[0] = time.perf_counter()

    def post(module, args, kwargs, output):
        sync()
        forwards[-1] += time.perf_counter() - started[0]
        calls[0] += 1

    run.worker.merger.apply = timed_apply
    model = run.worker.merger.model
    hooks = [
        model.register_forward_pre_hook(pre, with_kwargs=True),
        model.register_forward_hook(post, with_kwargs=True),
    ]
    try:
        t = time.perf_counter()
        run.search()
        end = time.perf_counter()
        search_s = end - t
    finally:
        for h in hooks:
            h.remove()
        run.close()
    params = sum(p.numel() for p in model.parameters())  # tied weights count once
    trials = RunStore.open(run_dir).trials("search", everything=True)
    failed = [t.reason for t in trials if t.status != "ok"]
    if failed:
        raise RuntimeError(f"{len(failed)} of {len(trials)} candidates failed, first: {failed[0]}")
    seconds = [t.seconds for t in trials]
    if len(merges) != len(trials):
        raise RuntimeError(f"{len(merges)} merges for {len(trials)} trials; expected one per candidate")
    n = len(trials)
    cand_s = search_s / n
    fwd_s = sum(forwards) / n
    # Steady state: from the second candidate's merge to the end of the
    # search, so the driver's and the study's time between trials counts too.
    steady_s = (end - starts[1]) / (n - 1) if n > 1 else float("nan")
    steady_fwd = sum(forwards[1:]) / (n - 1) if n > 1 else float("nan")
    return {
        "params": params,
        "candidates": n,
        "startup_s": startup_s,
        "construct_s": construct_s,
        "search_s": search_s,
        "candidate_s": cand_s,
        "trial_median_s": statistics.median(seconds),
        "trial_first_s": seconds[0],
        "merge_s": sum(merges) / n,
        "forward_s": fwd_s,
        "forward_calls": calls[0],
        "overhead_share": (cand_s - fwd_s) / cand_s,
        "steady_candidate_s": steady_s,
        "steady_overhead_share": (steady_s - steady_fwd) / steady_s,
        "fused": run.worker.merger.fuse,
        "threads": torch.get_num_threads(),
        "best_acc": max(t.fitness for t in trials),
    }


def random_route(rng: random.Random, depths: dict[str, int]):
    """A routed candidate: steps from mixed models, depth between the sources'
    and twice it, input scales in [0.7, 1.4], at least one layer twice."""
    from evomerge.engine.recipe import Route, RouteStep

    names = sorted(depths)
    depth = max(depths.values())
    steps = []
    for _ in range(rng.randint(depth, 2 * depth) - 1):
        name = rng.choice(names)
        steps.append(RouteStep(model=name, layer=rng.randrange(depths[name]), scale=round(rng.uniform(0.7, 1.4), 4)))
    steps.append(steps[rng.randrange(len(steps))])  # a repeat
    return Route(layers=steps)


def bench_routing(root: Path, routes: int, candidates: int) -> dict:
    """Routed candidates, in this process: Router.assemble per route and
    Evaluator.score per routed candidate, on the search config's task."""
    from evomerge.engine.routing import Router, load_live
    from evomerge.fitness.evaluate import Evaluator
    from evomerge.fitness.spec import EvalSpec

    config = yaml.safe_load((root / "search.yaml").read_text())
    folders = {name: root / "models" / name for name in EXPERTS}
    t = time.perf_counter()
    router = Router({name: load_live(path, torch.float32, DEVICE) for name, path in folders.items()})
    load_s = time.perf_counter() - t
    rng = random.Random(0)
    t = time.perf_counter()
    plans = [random_route(rng, router.depths) for _ in range(routes)]
    route_build_s = (time.perf_counter() - t) / routes  # building and validating a Route object
    router.assemble(plans[0])  # first call: imports, lazy attributes
    assemble = []
    for plan in plans:
        t = time.perf_counter()
        router.assemble(plan)
        assemble.append(time.perf_counter() - t)
    evaluator = Evaluator(EvalSpec.from_dict(config["eval"]), tokenizer=folders["base"], root=root, device=DEVICE)
    scores, depths = [], []
    for plan in [random_route(rng, router.depths) for _ in range(candidates + 1)]:
        host = router.assemble(plan)
        score = evaluator.score(host)
        if score.status != "ok":
            raise RuntimeError(f"a routed candidate failed: {score.reason}")
        scores.append(score)
        depths.append(len(plan.layers))
    steady = scores[1:] or scores  # the first builds lm-eval's wrapper around the host
    assemble_s = statistics.median(assemble)
    eval_s = statistics.median(s.seconds for s in steady)
    return {
        "routing_load_s": load_s,
        "routing_routes": routes,
        "routing_route_build_s": route_build_s,
        "routing_assemble_s": assemble_s,
        "routing_assemble_p95_s": sorted(assemble)[int(0.95 * (len(assemble) - 1))],
        "routing_assemble_max_s": max(assemble),
        "routing_candidates": len(steady),
        "routing_depth_mean": statistics.mean(depths[1:] or depths),
        "routing_source_depth": max(router.depths.values()),
        "routing_eval_s": eval_s,
        "routing_forward_s": statistics.median(s.eval_seconds for s in steady),
        "routing_first_eval_s": scores[0].seconds,
        "routing_share": assemble_s / eval_s,
        "routing_best_acc": max(s.values[next(iter(s.values))] for s in scores),
        "routing_threads": torch.get_num_threads(),
    }


def _run(cmd: list[str], what: str) -> float:
    t = time.perf_counter()
    r = subprocess.run(cmd, capture_output=True, text=True)
    wall = time.perf_counter() - t
    if r.returncode:
        tail = (r.stdout + r.stderr)[-3000:]
        raise RuntimeError(f"{what} failed with exit code {r.returncode}:\n{tail}")
    return wall


def bench_loop(root: Path, candidates: int, docs: int) -> dict:
    """The loop without evomerge: mergekit-yaml then lm_eval per candidate."""
    bindir = Path(sys.executable).parent
    num_layers = json.loads((root / "models" / "base" / "config.json").read_text())["num_hidden_layers"]
    scratch = root / "loop"
    shutil.rmtree(scratch, ignore_errors=True)
    scratch.mkdir()
    rng = random.Random(1)
    walls, merge_walls, eval_walls, accs = [], [], [], []
    for i in range(candidates):
        t = time.perf_counter()
        config = {
            "merge_method": "task_arithmetic",
            "base_model": str(root / "models" / "base"),
            "dtype": "float32",
            "models": [
                {
                    "model": str(root / "models" / name),
                    # a list is a mergekit gradient; one value per layer is a per-layer weight
                    "parameters": {"weight": [round(rng.uniform(0.0, 1.0), 4) for _ in range(num_layers)]},
                }
                for name in ("expert_a", "expert_b")
            ],
        }
        cfg = scratch / f"candidate{i}.yml"
        cfg.write_text(yaml.safe_dump(config, sort_keys=False))
        out = scratch / f"merged{i}"
        results = scratch / f"results{i}"
        merge_walls.append(
            _run([str(bindir / "mergekit-yaml"), str(cfg), str(out), "--copy-tokenizer", "--quiet"], "mergekit-yaml")
        )
        eval_walls.append(
            _run(
                [
                    str(bindir / "lm_eval"),
                    "--model",
                    "hf",
                    "--model_args",
                    f"pretrained={out},dtype=float32",
                    "--tasks",
                    TASK,
                    "--include_path",
                    str(root / "tasks"),
                    "--device",
                    DEVICE,
                    "--batch_size",
                    str(BATCH_SIZE),
                    "--output_path",
                    str(results),
                ],
                "lm_eval",
            )
        )
        walls.append(time.perf_counter() - t)
        found = sorted(results.rglob("results_*.json"))
        if not found:
            raise RuntimeError(f"lm_eval wrote no results under {results}")
        data = json.loads(found[-1].read_text())
        effective = data["n-samples"][TASK]["effective"]
        if effective != docs:
            raise RuntimeError(f"lm_eval scored {effective} documents, expected {docs}")
        accs.append(data["results"][TASK]["acc,none"])
        shutil.rmtree(out)
    shutil.rmtree(scratch, ignore_errors=True)
    return {
        "loop_candidates": candidates,
        "loop_candidate_s": sum(walls) / candidates,
        "loop_mergekit_s": sum(merge_walls) / candidates,
        "loop_lm_eval_s": sum(eval_walls) / candidates,
        "loop_accs": accs,
    }


def bench_size(size: str, workdir: Path, args: argparse.Namespace) -> dict:
    large = size in LARGE
    trials = args.large_trials if large else args.trials
    docs = (args.large_docs or args.docs) if large else args.docs
    root = build_experiment(workdir, size, docs, trials, args.driver)
    routing = run_routing(root, args, large) if args.routing or args.routing_only else {}
    if args.routing_only:
        return {"size": size, "docs": docs, **routing}
    # The search runs in a fresh process, timed from its launch; the loop's
    # candidates are processes anyway.
    cmd = [sys.executable, __file__, "--search", str(root), "--launched", repr(time.time())]
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode:
        raise RuntimeError(f"search for {size} failed:\n{r.stderr[-3000:]}")
    search = json.loads(r.stdout.splitlines()[-1])
    if search["candidates"] < trials:
        print(
            f"warning: {size}: the driver stopped after {search['candidates']} of {trials} candidates", file=sys.stderr
        )
    per_hour = 3600 / search["candidate_s"]
    row = {"size": size, "docs": docs, "driver": args.driver, **search, "candidates_per_hour": per_hour, **routing}
    if args.loop:
        loop = bench_loop(root, args.baseline_candidates, docs)
        loop_per_hour = 3600 / loop["loop_candidate_s"]
        row.update(loop, loop_candidates_per_hour=loop_per_hour, speedup=per_hour / loop_per_hour)
    return row


def run_routing(root: Path, args: argparse.Namespace, large: bool) -> dict:
    """bench_routing in a fresh process (same threads as the search's)."""
    candidates = args.large_routing_candidates if large else args.routing_candidates
    cmd = [sys.executable, __file__, "--routing-bench", str(root)]
    cmd += ["--routing-routes", str(args.routing_routes), "--routing-candidates", str(candidates)]
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode:
        raise RuntimeError(f"routing benchmark for {root.name} failed:\n{r.stderr[-3000:]}")
    return json.loads(r.stdout.splitlines()[-1])


def markdown(rows: list[dict]) -> str:
    head = (
        "| model | params | docs | candidates | startup s | evomerge s/candidate | median trial s | first trial s | "
        "steady s/candidate | "
        "merge s/candidate | forward s/candidate | overhead share | steady-state overhead | evomerge candidates/h | "
        "loop s/candidate (mergekit + lm_eval) | loop candidates/h | speed-up |"
    )
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        lines.append(
            f"| {r['size']} | {r['params'] / 1e6:.1f}M | {r['docs']} | {r['candidates']} | {r['startup_s']:.1f} | "
            f"{r['candidate_s']:.3f} | {r['trial_median_s']:.3f} | {r['trial_first_s']:.2f} | "
            f"{r['steady_candidate_s']:.3f} | {r['merge_s']:.3f} | "
            f"{r['forward_s']:.3f} | {100 * r['overhead_share']:.1f}% | {100 * r['steady_overhead_share']:.1f}% | "
            f"{r['candidates_per_hour']:.0f} | "
            + (
                f"{r['loop_candidate_s']:.1f} ({r['loop_mergekit_s']:.1f} + {r['loop_lm_eval_s']:.1f}) | "
                f"{r['loop_candidates_per_hour']:.0f} | {r['speedup']:.0f}x |"
                if "speedup" in r
                else "not run | | |"
            )
        )
    return "\n".join(lines)


def routing_markdown(rows: list[dict]) -> str:
    head = (
        "| model | routes | route depth (sources') | assemble ms (median) | assemble ms (p95) | "
        "Route build ms | candidates | eval s/candidate (median) | forward s | assemble / eval |"
    )
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        if "routing_share" not in r:
            continue
        lines.append(
            f"| {r['size']} | {r['routing_routes']} | {r['routing_depth_mean']:.1f} ({r['routing_source_depth']}) | "
            f"{1e3 * r['routing_assemble_s']:.3f} | {1e3 * r['routing_assemble_p95_s']:.3f} | "
            f"{1e3 * r['routing_route_build_s']:.3f} | {r['routing_candidates']} | {r['routing_eval_s']:.3f} | "
            f"{r['routing_forward_s']:.3f} | {100 * r['routing_share']:.3f}% |"
        )
    return "\n".join(lines)


def routing_targets(rows: list[dict]) -> str:
    parts = []
    for r in rows:
        if "routing_share" in r:
            verdict = "PASS" if r["routing_share"] < TARGET_ROUTING else "FAIL"
            parts.append(
                f"{r['size']} routed assemble/eval < {100 * TARGET_ROUTING:.0f}%: {verdict} "
                f"({100 * r['routing_share']:.3f}%)"
            )
    return "routing targets: " + ("; ".join(parts) or "not measured")


def targets(rows: list[dict]) -> str:
    by = {r["size"]: r for r in rows}
    parts = []
    if "speedup" in by.get("tiny", {}):
        s = by["tiny"]["speedup"]
        verdict = "PASS" if s >= TARGET_SPEEDUP else "FAIL"
        parts.append(f"tiny speed-up >= {TARGET_SPEEDUP:.0f}x: {verdict} ({s:.0f}x)")
    else:
        parts.append("tiny speed-up: not measured")
    if "135m" in by:
        o, st = by["135m"]["overhead_share"], by["135m"]["steady_overhead_share"]
        verdict = "PASS" if o <= TARGET_OVERHEAD else "FAIL"
        parts.append(
            f"135m overhead share <= {100 * TARGET_OVERHEAD:.0f}%: {verdict} "
            f"({100 * o:.1f}%; steady state {100 * st:.1f}%)"
        )
    else:
        parts.append("135m overhead share: not measured")
    return "targets: " + "; ".join(parts)


SLEEP_OBJECTIVE = """
import time


def score(model, tokenizer):
    time.sleep({sleep})
    return {{"mean": float(next(model.parameters()).float().mean())}}
"""


def bench_executors(workdir: Path, args: argparse.Namespace) -> list[dict]:
    """1 against 2 Ray workers with a sleeping objective (see the docstring, 5)."""
    import ray

    import evomerge.run.run
    from evomerge.run.run import Run

    root = build_experiment(workdir, "tiny", 10, args.executor_trials, "random")
    (root / "sleep_objective.py").write_text(SLEEP_OBJECTIVE.format(sleep=args.sleep))
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    ray.init(
        num_cpus=2, include_dashboard=False, log_to_driver=False, _system_config={"enable_metrics_collection": False}
    )
    made = []
    real = evomerge.run.run.make_executor

    def keep(*a, **k):
        made.append(real(*a, **k))
        return made[-1]

    evomerge.run.run.make_executor = keep
    rows = []
    try:
        for driver in args.executor_drivers.split(","):
            config = {
                "base_model": "models/base",
                "models": ["models/expert_a", "models/expert_b"],
                "space": "task_arithmetic_layerwise",
                "eval": {"objectives": [{"custom": "sleep_objective:score", "metric": "mean"}]},
                "budget": {"trials": args.executor_trials},
                "driver": {"name": driver, **({"restarts": 9} if driver == "cma" else {"startup_trials": 5})},
                "baselines": False,
                "dtype": "float32",
                "device": "cpu",
                "executor": {"name": "ray", "num_cpus": 1},
                "seed": 0,
            }
            (root / f"executors_{driver}.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
            row = {"driver": driver, "sleep_s": args.sleep, "candidates": args.executor_trials}
            for workers in (1, 2):
                run_dir = root / f"run-executors-{driver}-{workers}"
                shutil.rmtree(run_dir, ignore_errors=True)
                run = Run(root / f"executors_{driver}.yaml", run_dir, executor={"workers": workers}, progress=False)
                try:
                    run.search()
                finally:
                    run.close()
                timeline = made[-1].timeline
                start = min(t[1] for t in timeline)
                span = max(t[2] for t in timeline) - start
                busy = sum(t[2] - t[1] for t in timeline)
                gaps = []
                for w in range(workers):
                    mine = sorted((s, e) for i, s, e in timeline if i == w)
                    gaps += [b[0] - a[1] for a, b in zip(mine, mine[1:])]
                row[f"span_{workers}"] = span
                row[f"scored_{workers}"] = len(timeline)
                row[f"busy_per_candidate_{workers}"] = busy / len(timeline)
                row[f"gap_mean_{workers}"] = statistics.mean(gaps) if gaps else 0.0
                row[f"gap_max_{workers}"] = max(gaps) if gaps else 0.0
                row[f"gap_p95_{workers}"] = sorted(gaps)[int(0.95 * (len(gaps) - 1))] if gaps else 0.0
                # what the driver adds per candidate, from the span: span x workers = busy + idle
                row[f"overhead_{workers}"] = (span * workers - busy) / len(timeline)
            row["speedup"] = row["span_1"] / row["span_2"]
            rows.append(row)
    finally:
        evomerge.run.run.make_executor = real
        ray.shutdown()
    return rows


def _span(timeline) -> tuple[float, float]:
    """First start to last end, and the mean idle gap between one worker's candidates."""
    start = min(t[1] for t in timeline)
    gaps = []
    for w in {t[0] for t in timeline}:
        mine = sorted((s, e) for i, s, e in timeline if i == w)
        gaps += [b[0] - a[1] for a, b in zip(mine, mine[1:])]
    return max(t[2] for t in timeline) - start, statistics.mean(gaps) if gaps else 0.0


def bench_nodes(workdir: Path, args: argparse.Namespace) -> dict:
    """One worker against one per node on --nodes Ray nodes of one CPU each
    (ray.cluster_utils.Cluster on this machine), then the same with a node
    removed at a third of the budget (see the docstring, 6)."""
    import threading

    from ray.cluster_utils import Cluster

    import evomerge.run.executors.ray_executor as rx
    import evomerge.run.run
    from evomerge.run.run import Run
    from evomerge.run.store import RunStore

    root = build_experiment(workdir, "tiny", 10, args.executor_trials, "random")
    (root / "sleep_objective.py").write_text(SLEEP_OBJECTIVE.format(sleep=args.sleep))
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1})
    made, lost, real, real_lost = [], [], evomerge.run.run.make_executor, rx.RayExecutor._lost

    def keep(*a, **k):
        made.append(real(*a, **k))
        return made[-1]

    def lost_at(self, *a, **k):
        lost.append(time.time())
        return real_lost(self, *a, **k)

    evomerge.run.run.make_executor, rx.RayExecutor._lost = keep, lost_at
    config = {
        "base_model": "models/base",
        "models": ["models/expert_a", "models/expert_b"],
        "space": "task_arithmetic_layerwise",
        "eval": {"objectives": [{"custom": "sleep_objective:score", "metric": "mean"}]},
        "budget": {"trials": args.executor_trials},
        "driver": {"name": "tpe", "startup_trials": 5},
        "baselines": False,
        "dtype": "float32",
        "device": "cpu",
        "executor": {"name": "ray", "num_cpus": 1, "address": None},
        "seed": 0,
    }
    row = {"nodes": args.nodes, "sleep_s": args.sleep, "candidates": args.executor_trials}
    try:
        for _ in range(args.nodes - 1):
            cluster.add_node(num_cpus=1)
        cluster.wait_for_nodes()
        config["executor"]["address"] = cluster.address
        (root / "nodes.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
        for name, workers, kill in (("one", 1, False), ("all", args.nodes, False), ("lost", args.nodes, True)):
            run_dir = root / f"run-nodes-{name}"
            shutil.rmtree(run_dir, ignore_errors=True)
            run = Run(root / "nodes.yaml", run_dir, executor={"workers": workers}, progress=False)
            thread = threading.Thread(target=run.search, daemon=True)
            t0 = time.perf_counter()
            thread.start()
            killed, before = None, set()
            while thread.is_alive():
                time.sleep(0.05)
                if (
                    kill
                    and killed is None
                    and run.executor is not None
                    and len(made[-1].timeline) >= args.executor_trials // 3
                ):
                    before = {t.number for t in RunStore.open(run_dir).trials("search") if t.ok}
                    killed = time.time()
                    cluster.remove_node(next(iter(cluster.worker_nodes)))  # a pre-emption: the raylet and its workers
                    row["done_at_kill"] = len(before)
            thread.join()
            row[f"wall_{name}"] = time.perf_counter() - t0
            run.close()
            row[f"span_{name}"], row[f"gap_{name}"] = _span(made[-1].timeline)
            complete = RunStore.open(run_dir).trials("search")
            row[f"complete_{name}"] = len([t for t in complete if t.ok])
            if kill:
                row["requeue_s"] = (lost[0] - killed) if lost and killed else None
                row["lost_trials"] = len(before - {t.number for t in complete if t.ok})
                row["retried"] = sum(1 for t in complete if t.attempts > 1)
        row["speedup"] = row["span_one"] / row["span_all"]
    finally:
        evomerge.run.run.make_executor, rx.RayExecutor._lost = real, real_lost
        cluster.shutdown()
    return row


def nodes_markdown(r: dict) -> str:
    head = (
        "| nodes | sleep s | candidates | 1 worker: span s | 1 per node: span s | speed-up | idle gap ms (1 / all) "
        "| node removed at (trials done) | trials lost | re-queued after s | retried candidates | wall s: no loss / loss |"
    )
    line = (
        f"| {r['nodes']} | {r['sleep_s']} | {r['candidates']} | {r['span_one']:.2f} | {r['span_all']:.2f} | "
        f"{r['speedup']:.2f}x | {1e3 * r['gap_one']:.1f} / {1e3 * r['gap_all']:.1f} | {r.get('done_at_kill')} | "
        f"{r.get('lost_trials')} | {r['requeue_s']:.2f} | {r.get('retried')} | {r['wall_all']:.1f} / {r['wall_lost']:.1f} |"
        if r.get("requeue_s") is not None
        else f"| {r['nodes']} | {r['sleep_s']} | {r['candidates']} | {r['span_one']:.2f} | {r['span_all']:.2f} | "
        f"{r['speedup']:.2f}x | | | | | | |"
    )
    return "\n".join([head, "|" + "---|" * (head.count("|") - 1), line])


def executors_markdown(rows: list[dict]) -> str:
    head = (
        "| driver | sleep s | candidates | 1 worker: span s | 2 workers: span s | speed-up | "
        "worker s/candidate (1 / 2) | idle gap ms mean (1 / 2) | idle gap ms p95 / max (2) | "
        "overhead ms/candidate (1 / 2) |"
    )
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        lines.append(
            f"| {r['driver']} | {r['sleep_s']} | {r['candidates']} | {r['span_1']:.2f} | {r['span_2']:.2f} | "
            f"{r['speedup']:.2f}x | {r['busy_per_candidate_1']:.3f} / {r['busy_per_candidate_2']:.3f} | "
            f"{1e3 * r['gap_mean_1']:.1f} / {1e3 * r['gap_mean_2']:.1f} | "
            f"{1e3 * r['gap_p95_2']:.1f} / {1e3 * r['gap_max_2']:.1f} | "
            f"{1e3 * r['overhead_1']:.1f} / {1e3 * r['overhead_2']:.1f} |"
        )
    ok = all(r["speedup"] >= 1.8 and r["gap_mean_2"] <= 0.020 for r in rows)
    lines.append(
        f"targets (speed-up >= 1.8x, scheduling overhead <= 20 ms per candidate with 2 workers): "
        f"{'met' if ok else 'NOT met'}"
    )
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="tiny,135m")
    ap.add_argument("--workdir", default="runs/bench")
    ap.add_argument("--trials", type=int, default=40, help="evomerge candidates (search budget) per small model")
    ap.add_argument("--large-trials", type=int, default=5, help="evomerge candidates for the 135m model")
    ap.add_argument("--baseline-candidates", type=int, default=3, help="candidates of the mergekit + lm_eval loop")
    ap.add_argument(
        "--loop",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="time the mergekit + lm_eval loop (--no-loop: evomerge alone, e.g. where mergekit is not installed)",
    )
    ap.add_argument("--docs", type=int, default=100, help="documents in the task")
    ap.add_argument("--large-docs", type=int, help="documents in the task for the 135m model (default: --docs)")
    ap.add_argument("--driver", choices=("random", "cma"), default="random")
    ap.add_argument(
        "--threads",
        type=int,
        help="OMP_NUM_THREADS for every process timed (default: leave torch's default, one per core)",
    )
    ap.add_argument("--json", help="also write results here")
    ap.add_argument(
        "--routing",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="also time routed candidates: Router.assemble and their evaluation (default: on)",
    )
    ap.add_argument("--routing-only", action="store_true", help="time routed candidates only: no search, no loop")
    ap.add_argument("--routing-routes", type=int, default=200, help="random routes Router.assemble is timed on")
    ap.add_argument("--routing-candidates", type=int, default=5, help="routed candidates evaluated per small model")
    ap.add_argument("--large-routing-candidates", type=int, default=2, help="routed candidates evaluated for 135m")
    ap.add_argument("--executors", action="store_true", help="time the Ray executor, 1 worker against 2, only")
    ap.add_argument("--sleep", type=float, default=0.5, help="seconds the executors' objective sleeps")
    ap.add_argument("--executor-trials", type=int, default=40, help="candidates per executor run")
    ap.add_argument("--executor-drivers", default="tpe,cma", help="drivers the executors are timed with")
    ap.add_argument(
        "--nodes", type=int, help="time the Ray executor on this many Ray nodes of one CPU each, with a node lost, only"
    )
    ap.add_argument("--search", help=argparse.SUPPRESS)  # internal: run one search in this process
    ap.add_argument("--launched", type=float, help=argparse.SUPPRESS)
    ap.add_argument("--routing-bench", help=argparse.SUPPRESS)  # internal: time routed candidates in this process
    args = ap.parse_args()
    if args.search:
        print(json.dumps(bench_search(Path(args.search), args.launched)))
        return
    if args.routing_bench:
        print(json.dumps(bench_routing(Path(args.routing_bench), args.routing_routes, args.routing_candidates)))
        return
    sizes = args.sizes.split(",")
    unknown = [s for s in sizes if s not in SIZES]
    if unknown:
        ap.error(f"unknown size {unknown[0]!r}; use {', '.join(SIZES)}")
    if args.threads:
        os.environ["OMP_NUM_THREADS"] = str(args.threads)  # read by torch in each child process
    workdir = Path(args.workdir).resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    load = os.getloadavg()[0]  # other work on the machine competes for the cores
    if args.nodes or args.executors:
        t0 = time.perf_counter()
        if args.nodes:
            result = bench_nodes(workdir, args)
            what, table = (
                f"{args.nodes} Ray nodes on this machine (ray.cluster_utils.Cluster), one CPU each",
                nodes_markdown(result),
            )
        else:
            result = bench_executors(workdir, args)
            what, table = "local instance, CPU workers", executors_markdown(result)
        print(
            f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores; "
            f"{time.strftime('%Y-%m-%d')}; Ray executor, {what}; load average {load:.1f} before"
        )
        print(table)
        print(f"total wall time: {time.perf_counter() - t0:.0f} s")
        if args.json:
            Path(args.json).write_text(json.dumps(result, indent=2))
        return
    t0 = time.perf_counter()
    rows = [bench_size(s, workdir, args) for s in sizes]
    threads = rows[0].get("threads", rows[0].get("routing_threads", "?")) if rows else "?"
    print(
        f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, "
        f"{'cuda' if torch.cuda.is_available() else 'cpu'}; {time.strftime('%Y-%m-%d')}; driver {args.driver}, "
        f"torch threads {threads}, load average {load:.1f} before the run"
    )
    if not args.routing_only:
        print(markdown(rows))
        print(targets(rows))
    if args.routing or args.routing_only:
        print("routed candidates:")
        print(routing_markdown(rows))
        print(routing_targets(rows))
    print(f"total wall time: {time.perf_counter() - t0:.0f} s")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
