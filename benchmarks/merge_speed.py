"""Merge speed: evomerge against mergekit-yaml, to disk and in place.

In one run on one machine, for a tiny model and a randomly initialised Llama
of about 370M parameters (saved as float32 safetensors, and again as
bfloat16), this measures:

  a) `evomerge merge` against `mergekit-yaml` on the same TIES config:
     wall time and peak RSS of each, as separate processes;
  b) the in-place path's time per candidate (InPlaceMerger.apply with a new
     random recipe each time) on the same models, for TIES and for SCE;
  c) the in-place path's effective bandwidth (bytes of inputs read plus
     bytes of outputs written, per second) against this machine's memory copy
     bandwidth, measured in the same run.

Usage:
    .venv/bin/python benchmarks/merge_speed.py [--sizes tiny,large] [--repeats 3] [--candidates 10]

On a CUDA machine the in-place merger and the copy bandwidth run on the GPU
(the timers wait for it); --repeats 0 times the in-place path alone, for a
machine without mergekit.

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
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402
import yaml  # noqa: E402

from evomerge.app.demo.tiny import make_finetune, make_tiny_model  # noqa: E402

_LARGE = dict(
    layers=20,
    hidden=1024,
    intermediate_size=4096,
    num_attention_heads=16,
    num_key_value_heads=4,
    vocab_size=32000,
)
SIZES = {
    # name: (config overrides for evomerge.app.demo.tiny.tiny_config, storage and merge dtype)
    "tiny": (dict(layers=4, hidden=64), "float32"),
    "large": (_LARGE, "float32"),
    # bfloat16 merges round after every operation, as mergekit's do; the
    # fused in-place kernel emulates each rounding, which costs compute.
    "large-bf16": (_LARGE, "bfloat16"),
}

# Run a command and report its own peak RSS: a wrapper process per command,
# so RUSAGE_CHILDREN covers exactly one child.
_WRAPPER = (
    "import resource, subprocess, sys, time;"
    "t = time.perf_counter(); r = subprocess.run(sys.argv[1:], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE);"
    "w = time.perf_counter() - t;"
    "sys.stderr.write(r.stderr.decode()[-2000:] if r.returncode else '');"
    "print(r.returncode, w, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)"
)


def build_models(workdir: Path, size: str) -> dict[str, Path]:
    overrides, dtype = SIZES[size]
    root = workdir / size
    paths = {"base": root / "base", "a": root / "a", "b": root / "b"}
    if not (paths["b"] / "config.json").is_file():
        print(f"building {size} models in {root} ...", file=sys.stderr)
        shutil.rmtree(root, ignore_errors=True)
        make_tiny_model(paths["base"], arch="llama", seed=0, dtype=dtype, **overrides)
        make_finetune(paths["base"], paths["a"], seed=1)
        make_finetune(paths["base"], paths["b"], seed=2)
    return paths


def ties_config(paths: dict[str, Path], dtype: str, rng: random.Random | None = None) -> dict:
    def p():
        if rng is None:
            return {"weight": 0.6, "density": 0.5}
        return {"weight": round(rng.uniform(0.1, 1.0), 4), "density": round(rng.uniform(0.2, 0.9), 4)}

    return {
        "merge_method": "ties",
        "base_model": str(paths["base"]),
        "dtype": dtype,
        "models": [
            {"model": str(paths["a"]), "parameters": p()},
            {"model": str(paths["b"]), "parameters": p()},
            {"model": str(paths["base"])},
        ],
    }


def sce_config(paths: dict[str, Path], dtype: str, rng: random.Random) -> dict:
    """An SCE config over the same models, with a random select_topk."""
    return {
        "merge_method": "sce",
        "base_model": str(paths["base"]),
        "dtype": dtype,
        "parameters": {"select_topk": round(rng.uniform(0.1, 1.0), 4)},
        "models": [{"model": str(paths["a"])}, {"model": str(paths["b"])}, {"model": str(paths["base"])}],
    }


def run_measured(cmd: list[str]) -> tuple[float, float]:
    """(wall seconds, peak RSS in MiB) of ``cmd`` run as its own process."""
    out = subprocess.run([sys.executable, "-c", _WRAPPER, *cmd], capture_output=True, text=True, check=True)
    code, wall, rss_kib = out.stdout.split()
    if code != "0":
        raise RuntimeError(f"{cmd[0]} failed:\n{out.stderr}")
    return float(wall), int(rss_kib) / 1024


DEVICE = "cuda" if torch.cuda.is_available() else "cpu"  # where the in-place merger works


def sync() -> None:
    """Wait for the GPU's queued work, so that a timer stops when it is done."""
    if DEVICE == "cuda":
        torch.cuda.synchronize()


def copy_bandwidth(nbytes: int = 1 << 30, repeats: int = 5) -> float:
    """GB/s of a large tensor copy on DEVICE (bytes read + bytes written)."""
    src = torch.ones(nbytes // 4, dtype=torch.float32, device=DEVICE)
    dst = torch.empty_like(src)
    times = []
    for _ in range(repeats):
        sync()
        t = time.perf_counter()
        dst.copy_(src)
        sync()
        times.append(time.perf_counter() - t)
    return 2 * nbytes / min(times) / 1e9


def bench_size(size: str, workdir: Path, repeats: int, candidates: int) -> dict:
    paths = build_models(workdir, size)
    dtype = SIZES[size][1]
    cfg_path = workdir / f"{size}-ties.yaml"
    cfg_path.write_text(yaml.safe_dump(ties_config(paths, dtype)))
    bindir = Path(sys.executable).parent
    row: dict = {"size": size, "dtype": dtype}
    cmds = {
        "mergekit-yaml": [str(bindir / "mergekit-yaml"), str(cfg_path), str(workdir / "out-mk")],
        "evomerge merge": [
            str(bindir / "evomerge"),
            "merge",
            str(cfg_path),
            str(workdir / "out-em"),
            "--allow-outside-paths",
            "--no-progress",
            "--overwrite",
        ],
    }
    disk: dict[str, list[tuple[float, float]]] = {k: [] for k in cmds}
    for _ in range(repeats):  # alternate, so drift on a noisy machine hits both
        for name, cmd in cmds.items():
            shutil.rmtree(workdir / "out-mk", ignore_errors=True)
            disk[name].append(run_measured(cmd))
    for d in ("out-mk", "out-em"):
        shutil.rmtree(workdir / d, ignore_errors=True)
    if repeats:  # --repeats 0: in place only (a machine without mergekit)
        mk_wall = statistics.median(w for w, _ in disk["mergekit-yaml"])
        em_wall = statistics.median(w for w, _ in disk["evomerge merge"])
        row.update(
            mergekit_wall_s=mk_wall,
            mergekit_peak_rss_mib=max(r for _, r in disk["mergekit-yaml"]),
            evomerge_wall_s=em_wall,
            evomerge_peak_rss_mib=max(r for _, r in disk["evomerge merge"]),
            disk_speedup=mk_wall / em_wall,
        )

    # In-place timing runs in a fresh process per size, so that neither memory
    # nor compiled kernels left by an earlier size affect it.
    cmd = [sys.executable, __file__, "--inplace", size, "--workdir", str(workdir), "--candidates", str(candidates)]
    inplace = json.loads(subprocess.run(cmd, capture_output=True, text=True, check=True).stdout.splitlines()[-1])
    cand_s = inplace["candidate_s"]
    copy_gbs = copy_bandwidth()
    row.update(
        params=inplace["params"],
        inplace_load_s=inplace["load_s"],
        inplace_first_apply_s=inplace["first_apply_s"],
        inplace_candidate_s=cand_s,
        inplace_sce_candidate_s=inplace["sce_candidate_s"],
        inplace_gbs=inplace["bytes"] / cand_s / 1e9,
        copy_gbs=copy_gbs,
        inplace_share_of_copy=inplace["bytes"] / cand_s / 1e9 / copy_gbs,
    )
    if repeats:
        row["inplace_vs_mergekit"] = row["mergekit_wall_s"] / cand_s
    return row


def bench_inplace(size: str, workdir: Path, candidates: int) -> dict:
    """Time InPlaceMerger.apply on new random recipes (run in its own process)."""
    from evomerge.engine.merge import InPlaceMerger, plan_merge
    from evomerge.engine.recipe import Recipe

    paths = build_models(workdir, size)
    dtype = SIZES[size][1]
    template = Recipe.from_dict(ties_config(paths, dtype))
    t = time.perf_counter()
    merger = InPlaceMerger(template, allow_outside=True)
    load_s = time.perf_counter() - t
    t = time.perf_counter()
    merger.apply(template)  # the first call also builds the resident caches
    sync()
    first_s = time.perf_counter() - t
    rng = random.Random(0)

    def timed(config) -> list[float]:
        out = []
        for _ in range(candidates):
            recipe = Recipe.from_dict(config(paths, dtype, rng))
            t = time.perf_counter()
            merger.apply(recipe)
            sync()
            out.append(time.perf_counter() - t)
        return out

    per_candidate = timed(ties_config)
    # SCE on the same live model, after one untimed first call, as for TIES.
    merger.apply(Recipe.from_dict(sce_config(paths, dtype, rng)))
    sync()
    per_sce = timed(sce_config)
    plan = plan_merge(template, merger.sources)
    # Bytes of the source tensors read plus bytes of the merged tensors written.
    n = sum(j.nbytes // j.out_dtype.itemsize for j in plan.jobs)
    nbytes = sum(
        j.nbytes // j.out_dtype.itemsize * (j.compute_dtype.itemsize * len(j.inputs)) + j.nbytes for j in plan.jobs
    )
    return {
        "params": n,
        "bytes": nbytes,
        "load_s": load_s,
        "first_apply_s": first_s,
        "candidate_s": statistics.median(per_candidate),
        "sce_candidate_s": statistics.median(per_sce),
        "fused": merger.fuse,
    }


def markdown(rows: list[dict]) -> str:
    head = (
        "| model | params | dtype | mergekit-yaml s | evomerge merge s | speed-up | mergekit peak RSS MiB | "
        "evomerge peak RSS MiB | in-place s/candidate | in-place vs mergekit | in-place GB/s | copy GB/s | share of copy | "
        "sce in-place s/candidate |"
    )
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        disk = (
            f"{r['mergekit_wall_s']:.2f} | {r['evomerge_wall_s']:.2f} | {r['disk_speedup']:.2f}x | "
            f"{r['mergekit_peak_rss_mib']:.0f} | {r['evomerge_peak_rss_mib']:.0f}"
            if "disk_speedup" in r
            else "not run | | | |"
        )
        versus = f"{r['inplace_vs_mergekit']:.0f}x" if "inplace_vs_mergekit" in r else ""
        lines.append(
            f"| {r['size']} | {r['params'] / 1e6:.1f}M | {r['dtype']} | {disk} | {r['inplace_candidate_s']:.3f} | "
            f"{versus} | {r['inplace_gbs']:.2f} | {r['copy_gbs']:.2f} | {100 * r['inplace_share_of_copy']:.0f}% | "
            f"{r['inplace_sce_candidate_s']:.3f} |"
        )
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="tiny,large,large-bf16")
    ap.add_argument("--workdir", default="runs/bench")
    ap.add_argument("--repeats", type=int, default=3, help="to-disk runs per tool (0: in place only, no mergekit)")
    ap.add_argument("--candidates", type=int, default=10, help="in-place candidates timed")
    ap.add_argument("--json", help="also write results here")
    ap.add_argument("--inplace", help=argparse.SUPPRESS)  # internal: time one size in place
    args = ap.parse_args()
    workdir = Path(args.workdir).resolve()
    if args.inplace:
        print(json.dumps(bench_inplace(args.inplace, workdir, args.candidates)))
        return
    workdir.mkdir(parents=True, exist_ok=True)
    rows = [bench_size(s, workdir, args.repeats, args.candidates) for s in args.sizes.split(",")]
    print(
        f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, "
        f"{DEVICE}"
        + (f" ({torch.cuda.get_device_name(0)})" if DEVICE == "cuda" else "")
        + f"; {time.strftime('%Y-%m-%d')}"
    )
    print(markdown(rows))
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
