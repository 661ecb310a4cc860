"""Memory and time of the in-place merger's strategies as the experts grow.

For a randomly initialised Llama of 12 layers, hidden 1024, MLP 4096 and a
vocabulary of 4096 (0.76 GB in float32, its bfloat16 copy half that; its
largest tensor is 2.2% of the model, as a 7B Llama's embedding is 2.0% of
it) and 2, 4 and 8 seeded fine-tunes of it, each row runs in a fresh
process (``--layers 8 --vocab 32000`` is the issue's probe shape, whose
embedding is 17.5% of the model):

  1. imports torch, transformers and evomerge and warms torch.compile up on
     a 4-element function (its imports weigh ~150 MB; the fused kernels
     compile on first use), then reads the process floor (its resident
     memory before any source is opened; the floor before the warm-up is
     recorded too, as ``imported``);
  2. builds ``InPlaceMerger(recipe, memory=STRATEGY)`` (the memory plan, from
     the headers; a plan that does not fit is refused and recorded as such);
  3. times the first candidate (``apply``: the cached strategy also builds its
     caches there) and then ``--candidates`` more, each with new seeded random
     parameters, and reports their median;
  4. reports the peak resident memory (``ru_maxrss``), the peak above the
     floor, in model sizes, and the plan's prediction beside it.

Usage:
    .venv/bin/python benchmarks/memory_scale.py [--experts 2,4,8] [--methods ties,...]
        [--strategies cached,lean,offload] [--dtypes float32,bfloat16] [--candidates 3]
        [--workdir /tmp/evomerge-memory] [--json out.json]

Each child runs at one torch thread (``OMP_NUM_THREADS=1``), so that rows
compare. ``--ratios`` times lean against cached side by side instead: one
process per method and dtype (2 experts) holds one cached merger and
alternates its candidates between its caches and none (exactly a lean
candidate's work), so both strategies see the same machine at the same time. On a CPU ``offload`` is the lean strategy (nothing to offload to);
its rows measure that. Results go to stdout as a markdown table (copy it
into docs/benchmarks.md) and to --json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

SHAPE = dict(hidden=1024, intermediate_size=4096, num_attention_heads=16, num_key_value_heads=4)
METHODS = ("ties", "dare_ties", "task_arithmetic", "della", "sce", "multislerp")


def build_models(workdir: Path, dtype: str, experts: int, layers: int, vocab: int) -> dict:
    """The base and ``experts`` fine-tunes, saved once under ``workdir``."""
    from evomerge.app.demo.tiny import make_finetune, make_tiny_model

    root = workdir / f"{dtype}-{layers}x1024-vocab{vocab}"
    base = root / "base"
    if not (base / "config.json").is_file():
        print(f"building the {dtype} base in {base} ...", file=sys.stderr)
        make_tiny_model(base, arch="llama", seed=0, dtype=dtype, layers=layers, vocab_size=vocab, **SHAPE)
    fts = []
    for i in range(experts):
        out = root / f"ft{i}"
        if not (out / "config.json").is_file():
            print(f"building fine-tune {i} in {out} ...", file=sys.stderr)
            make_finetune(base, out, seed=100 + i)
        fts.append(out)
    return {"base": base, "ft": fts}


def recipe(method: str, paths: dict, dtype: str, rng: random.Random) -> dict:
    """A recipe of ``method`` over the base and every fine-tune, with seeded random parameters."""
    ft = [str(p) for p in paths["ft"]]
    base = str(paths["base"])

    def u(lo, hi):
        return round(rng.uniform(lo, hi), 4)

    per_model = {
        "ties": lambda: {"weight": u(0.1, 1.0), "density": u(0.2, 0.9)},
        "dare_ties": lambda: {"weight": u(0.1, 1.0), "density": u(0.2, 0.9)},
        "task_arithmetic": lambda: {"weight": u(0.1, 1.0)},
        "della": lambda: {"weight": u(0.1, 1.0), "density": u(0.3, 0.9), "epsilon": u(0.01, 0.1)},
        "multislerp": lambda: {"weight": u(0.1, 1.0)},
    }
    data = {"method": method, "base_model": base, "dtype": dtype, "seed": rng.randrange(1 << 20)}
    if method == "sce":
        data["parameters"] = {"select_topk": u(0.1, 1.0)}
        data["sources"] = [{"model": base}] + [{"model": m} for m in ft]
    else:
        data["sources"] = [{"model": base}] + [{"model": m, "parameters": per_model[method]()} for m in ft]
    return data


def rss_bytes() -> int:
    """This process's resident memory now."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def peak_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def child(args) -> dict:
    """One row, in this (fresh) process."""
    import torch
    import transformers  # noqa: F401  (part of the floor, as in a search)

    from evomerge.engine.merge import InPlaceMerger
    from evomerge.engine.recipe import Recipe
    from evomerge.errors import EvomergeError

    paths = build_models(Path(args.workdir), args.dtype, args.n, args.layers, args.vocab)
    rng = random.Random(0)
    imported = rss_bytes()
    # The fused kernels compile on first use, and torch.compile's own imports
    # (inductor, sympy) weigh about 150 MB: part of the floor, as torch's are.
    warm = torch.compile(lambda a, b: (a * 2 + b).sign() * a, dynamic=True)
    warm(torch.ones(4), torch.ones(4))
    floor = rss_bytes()
    first = Recipe.from_dict(recipe(args.method, paths, args.dtype, rng))
    row = {"method": args.method, "experts": args.n, "strategy": args.strategy, "dtype": args.dtype, "floor": floor}
    row["imported"] = imported
    row["pid"] = os.getpid()
    t = time.perf_counter()
    try:
        merger = InPlaceMerger(first, allow_outside=True, memory=args.strategy)
    except EvomergeError as e:
        return {**row, "refused": str(e)}
    row["open_s"] = time.perf_counter() - t
    plan = merger.memory_plan
    row["model_bytes"] = plan.model_bytes
    row["predicted"] = plan.need(args.strategy)[0]
    row["resident"] = plan.parts[0].live + plan.parts[0].sources  # lean's floor: the live model and the sources
    row["largest"] = max(p.numel() * p.element_size() for p in merger.model.parameters())
    t = time.perf_counter()
    merger.apply(first)
    row["first_s"] = time.perf_counter() - t
    times = []
    for _ in range(args.candidates):
        r = Recipe.from_dict(recipe(args.method, paths, args.dtype, rng))
        t = time.perf_counter()
        merger.apply(r)
        times.append(time.perf_counter() - t)
    row["candidate_s"] = statistics.median(times) if times else None
    row["peak"] = peak_bytes()
    row["threads"] = torch.get_num_threads()
    return row


def ratio_child(args) -> dict:
    """Lean's time per candidate against cached's, side by side in one process:
    one cached merger, whose candidates alternate between its caches and none
    (a lean candidate's exact work), so that both see the same machine."""
    from evomerge.engine.merge import InPlaceMerger
    from evomerge.engine.recipe import Recipe

    paths = build_models(Path(args.workdir), args.dtype, args.n, args.layers, args.vocab)
    rng = random.Random(0)
    first = Recipe.from_dict(recipe(args.method, paths, args.dtype, rng))
    merger = InPlaceMerger(first, allow_outside=True, memory="cached")
    t = time.perf_counter()
    merger.apply(first)  # builds the caches
    build_s = time.perf_counter() - t
    kept, cache = merger.cached_tensors, merger._cache
    times = {"cached": [], "lean": []}
    for _ in range(args.candidates):
        r = Recipe.from_dict(recipe(args.method, paths, args.dtype, rng))
        for strategy in ("cached", "lean"):
            merger.cached_tensors, merger._cache = (kept, cache) if strategy == "cached" else (set(), None)
            t = time.perf_counter()
            merger.apply(r)
            times[strategy].append(time.perf_counter() - t)
    merger.cached_tensors, merger._cache = kept, cache
    cached, lean = statistics.median(times["cached"]), statistics.median(times["lean"])
    return {
        "method": args.method,
        "dtype": args.dtype,
        "experts": args.n,
        "build_s": build_s,
        "cached_s": cached,
        "lean_s": lean,
    }


def run_child(method: str, n: int, strategy: str, dtype: str, args) -> dict:
    cmd = [sys.executable, __file__, "--child", method, str(n), strategy, dtype]
    cmd += ["--workdir", args.workdir, "--candidates", str(args.candidates)]
    cmd += ["--layers", str(args.layers), "--vocab", str(args.vocab)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    out = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if out.returncode != 0:
        tail = out.stderr.strip().splitlines()[-1:] or ["(no output)"]
        return {"method": method, "experts": n, "strategy": strategy, "dtype": dtype, "failed": tail[0]}
    return json.loads(out.stdout.strip().splitlines()[-1])


def ratio_rows(args) -> None:
    """The side-by-side timing, a fresh process per method and dtype."""
    rows = []
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    for dtype in args.dtypes.split(","):
        build_models(Path(args.workdir), dtype, 2, args.layers, args.vocab)
        for method in args.methods.split(","):
            cmd = [sys.executable, __file__, "--ratio-child", method, dtype, "--workdir", args.workdir]
            cmd += ["--candidates", str(args.candidates), "--layers", str(args.layers), "--vocab", str(args.vocab)]
            out = subprocess.run(cmd, capture_output=True, text=True, env=env)
            if out.returncode != 0:
                rows.append(
                    {"method": method, "dtype": dtype, "failed": (out.stderr.strip().splitlines() or ["?"])[-1]}
                )
            else:
                rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
            print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
            if args.json:
                Path(args.json).write_text(json.dumps(rows, indent=1))
    print(
        "| dtype | method | experts | cached s per candidate | lean s per candidate | lean / cached | cache build s |"
    )
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        if "failed" in r:
            print(f"| {r['dtype']} | {r['method']} | 2 | failed: {r['failed']} ||||")
            continue
        print(
            f"| {r['dtype']} | {r['method']} | {r['experts']} | {r['cached_s']:.2f} | {r['lean_s']:.2f} | "
            f"{r['lean_s'] / r['cached_s']:.2f} | {r['build_s']:.1f} |"
        )


def _gb(n) -> str:
    return f"{n / 1e9:.2f}"


def markdown(rows: list[dict]) -> str:
    head = (
        "| dtype | method | experts | strategy | floor GB | peak GB | above floor GB | model sizes | "
        "limit (experts + 2.5) | beyond model and sources, in largest tensors | predicted GB | predicted / measured | "
        "first candidate s | s per candidate |\n"
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"
    )
    lines = [head]
    for r in rows:
        key = f"| {r['dtype']} | {r['method']} | {r['experts']} | {r['strategy']} |"
        if "refused" in r or "failed" in r:
            why = r.get("refused") or r.get("failed")
            lines.append(f"{key} {'refused by the plan' if 'refused' in r else 'failed'}: {why} |||||||||||")
            continue
        above = r["peak"] - r["floor"]
        sizes = above / r["model_bytes"]
        cand = f"{r['candidate_s']:.2f}" if r["candidate_s"] is not None else "-"
        lines.append(
            f"{key} {_gb(r['floor'])} | {_gb(r['peak'])} | {_gb(above)} | {sizes:.2f} | {r['experts'] + 2.5} | "
            f"{(above - r['resident']) / r['largest']:.1f} | "
            f"{_gb(r['predicted'])} | {r['predicted'] / above:.3f} | {r['first_s']:.2f} | {cand} |"
        )
    return "\n".join(lines)


def ratios(rows: list[dict]) -> str:
    """Lean's time per candidate against cached's, per method, dtype and experts."""
    by = {(r["dtype"], r["method"], r["experts"], r["strategy"]): r for r in rows if "candidate_s" in r}
    out = [
        "| dtype | method | experts | lean / cached s per candidate | lean / cached first candidate |",
        "|---|---|---|---|---|",
    ]
    for (dtype, method, n, strategy), r in sorted(by.items()):
        cached = by.get((dtype, method, n, "cached"))
        if strategy != "lean" or cached is None or not cached["candidate_s"]:
            continue
        out.append(
            f"| {dtype} | {method} | {n} | {r['candidate_s'] / cached['candidate_s']:.2f} | "
            f"{r['first_s'] / cached['first_s']:.2f} |"
        )
    return "\n".join(out)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--experts", default="2,4,8")
    p.add_argument("--methods", default=",".join(METHODS))
    p.add_argument("--strategies", default="cached,lean,offload")
    p.add_argument("--dtypes", default="float32,bfloat16")
    p.add_argument("--candidates", type=int, default=3, help="candidates timed after the first")
    p.add_argument("--workdir", default="/tmp/evomerge-memory")
    p.add_argument("--layers", type=int, default=12, help="decoder layers (hidden 1024, MLP 4096)")
    p.add_argument("--vocab", type=int, default=4096, help="vocabulary: 4096 makes the largest tensor 2%% of the model")
    p.add_argument("--json", help="also write the rows here")
    p.add_argument("--child", nargs=4, metavar=("METHOD", "N", "STRATEGY", "DTYPE"), help=argparse.SUPPRESS)
    p.add_argument("--ratios", action="store_true", help="time lean against cached side by side (2 experts)")
    p.add_argument("--ratio-child", nargs=2, metavar=("METHOD", "DTYPE"), help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.ratio_child:
        args.method, args.dtype = args.ratio_child
        args.n = 2
        print(json.dumps(ratio_child(args)))
        return
    if args.ratios:
        ratio_rows(args)
        return
    if args.child:
        args.method, n, args.strategy, args.dtype = args.child
        args.n = int(n)
        print(json.dumps(child(args)))
        return
    experts = [int(n) for n in args.experts.split(",")]
    for dtype in args.dtypes.split(","):  # build once, outside the measured processes
        build_models(Path(args.workdir), dtype, max(experts), args.layers, args.vocab)
    rows = []
    for dtype in args.dtypes.split(","):
        for method in args.methods.split(","):
            for n in experts:
                for strategy in args.strategies.split(","):
                    row = run_child(method, n, strategy, dtype, args)
                    rows.append(row)
                    print(json.dumps(row), file=sys.stderr, flush=True)
                    if args.json:
                        Path(args.json).write_text(json.dumps(rows, indent=1))
    print(
        f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch at one thread; "
        f"Llama of {args.layers} layers, hidden 1024, vocabulary {args.vocab}"
    )
    print(markdown(rows))
    print()
    print(ratios(rows))


if __name__ == "__main__":
    main()
