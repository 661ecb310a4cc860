"""A 7B-shaped in-place search step on one GPU: memory: auto, TIES and DARE-TIES.

Builds a randomly initialised Llama shaped like a 7B one (32 layers, hidden
4096, MLP 11008, 32 query and 8 key-value heads, vocabulary 32000) in
bfloat16 directly on the GPU, and three seeded fine-tunes of it (the base
plus seeded noise), saves them as safetensors under --workdir (no download),
then for TIES and for DARE-TIES builds ``InPlaceMerger(..., memory="auto")``
and merges --candidates candidates with seeded random weights and densities.
It prints the memory plan, the strategy auto took, the peak GPU memory and
the seconds per candidate; then merges TIES's first candidate once more with
``memory="offload"`` and checks it against auto's (per-tensor sums).

Usage:
    python benchmarks/gpu_memory.py [--shape 7b|small] [--candidates 5] [--workdir DIR] [--json out.json]

``--shape small`` (4 layers, hidden 256) is the dry run for a machine
without a GPU; there everything runs on the CPU.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import random
import shutil
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

SHAPES = {
    "7b": dict(
        hidden_size=4096,
        intermediate_size=11008,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=8,
        vocab_size=32000,
    ),
    "small": dict(
        hidden_size=256,
        intermediate_size=688,
        num_hidden_layers=4,
        num_attention_heads=8,
        num_key_value_heads=2,
        vocab_size=1000,
    ),
}
EXPERTS = 3
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def sync() -> None:
    if DEVICE == "cuda":
        torch.cuda.synchronize()


def build(shape: str, workdir: Path) -> dict:
    """The base and the fine-tunes, made on the device and saved once."""
    import transformers

    paths = {"base": workdir / "base", "ft": [workdir / f"ft{i}" for i in range(EXPERTS)]}
    if all((p / "config.json").is_file() for p in [paths["base"], *paths["ft"]]):
        return paths
    shutil.rmtree(workdir, ignore_errors=True)
    t = time.perf_counter()
    config = transformers.LlamaConfig(**SHAPES[shape], max_position_embeddings=4096, tie_word_embeddings=False)
    torch.manual_seed(0)
    with torch.device(DEVICE):
        model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    model.save_pretrained(paths["base"])
    params = dict(model.named_parameters())
    base = {name: p.detach().clone() for name, p in params.items()}
    for i, out in enumerate(paths["ft"]):
        g = torch.Generator(device=DEVICE).manual_seed(100 + i)
        with torch.no_grad():
            for name, p in params.items():
                noise = torch.randn(p.shape, generator=g, device=DEVICE, dtype=torch.float32)
                std = float(base[name].float().std()) if p.numel() > 1 else 1.0
                p.copy_((base[name].float() + noise * (0.02 * (std or 1.0))).to(p.dtype))
                del noise
        model.save_pretrained(out)
    del model, params, base
    gc.collect()
    if DEVICE == "cuda":
        torch.cuda.empty_cache()
    print(f"built the base and {EXPERTS} fine-tunes in {workdir} in {time.perf_counter() - t:.0f} s", flush=True)
    return paths


def recipe(method: str, paths: dict, rng: random.Random):
    from evomerge.engine.recipe import Recipe

    sources = [{"model": str(paths["base"])}]
    for ft in paths["ft"]:
        weight, density = round(rng.uniform(0.2, 1.0), 4), round(rng.uniform(0.2, 0.9), 4)
        sources.append({"model": str(ft), "parameters": {"weight": weight, "density": density}})
    data = {"method": method, "base_model": str(paths["base"]), "dtype": "bfloat16", "sources": sources}
    return Recipe.from_dict({**data, "seed": rng.randrange(1 << 20)})


def bench(method: str, paths: dict, candidates: int) -> dict:
    from evomerge.engine.merge import InPlaceMerger

    rng = random.Random(0)
    if DEVICE == "cuda":
        torch.cuda.reset_peak_memory_stats()
    t = time.perf_counter()
    first = recipe(method, paths, rng)
    merger = InPlaceMerger(first, allow_outside=True, device=DEVICE, memory="auto")
    open_s = time.perf_counter() - t
    plan = merger.memory_plan
    print(f"{method}: the plan", flush=True)
    print(plan.table([int(0.9 * f) for f in [_free()]]), flush=True)
    print(f"{method}: memory: auto took {plan.describe(merger.strategy)}", flush=True)
    t = time.perf_counter()
    merger.apply(first)
    sync()
    first_s = time.perf_counter() - t
    times = []
    for _ in range(candidates):
        r = recipe(method, paths, rng)
        t = time.perf_counter()
        merger.apply(r)
        sync()
        times.append(time.perf_counter() - t)
    peak = torch.cuda.max_memory_allocated() if DEVICE == "cuda" else None
    row = {
        "method": method,
        "device": torch.cuda.get_device_name(0) if DEVICE == "cuda" else "cpu",
        "strategy": merger.strategy,
        "planned_bytes": plan.need(merger.strategy)[0],
        "model_bytes": plan.model_bytes,
        "peak_gpu_bytes": peak,
        "open_s": open_s,
        "first_s": first_s,
        "candidate_s": statistics.median(times) if times else None,
        "candidates": candidates,
    }
    peak_text = f"{peak / 1e9:.1f} GB peak GPU memory" if peak is not None else "(CPU: no GPU peak)"
    print(
        f"{method}: {merger.strategy}, planned {row['planned_bytes'] / 1e9:.1f} GB, {peak_text}, "
        f"open {open_s:.1f} s, first candidate {first_s:.1f} s, {row['candidate_s']:.2f} s per candidate",
        flush=True,
    )
    del merger
    gc.collect()
    if DEVICE == "cuda":
        torch.cuda.empty_cache()
    return row


def fingerprints(model) -> dict[str, float]:
    """A float64 sum of each parameter: a cheap check that two merges agree."""
    return {n: float(p.detach().double().sum()) for n, p in model.named_parameters()}


def offload_agrees(paths: dict) -> bool:
    """TIES's first candidate merged with memory: offload equals the same candidate under auto."""
    from evomerge.engine.merge import InPlaceMerger

    first = recipe("ties", paths, random.Random(0))
    sums = {}
    for memory in ("auto", "offload"):
        merger = InPlaceMerger(first, allow_outside=True, device=DEVICE, memory=memory)
        sums[memory] = fingerprints(merger.apply(first))
        del merger
        gc.collect()
        if DEVICE == "cuda":
            torch.cuda.empty_cache()
    same = sums["auto"] == sums["offload"]
    print(
        f"ties: offload gives {'the same' if same else 'OTHER'} weights as auto (per-tensor float64 sums)", flush=True
    )
    return same


def _free() -> int:
    from evomerge.engine.memory import free_bytes

    return free_bytes(torch.device(DEVICE))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", choices=sorted(SHAPES), default="7b")
    p.add_argument("--candidates", type=int, default=5)
    p.add_argument("--workdir", help="where the models go (default: /dev/shm when it has room, else /tmp)")
    p.add_argument("--json", help="also write the rows here")
    args = p.parse_args()
    need = 4 * 14e9 if args.shape == "7b" else 0
    shm = Path("/dev/shm")
    default = shm if shm.is_dir() and shutil.disk_usage(shm).free > need * 1.1 else Path("/tmp")
    workdir = Path(args.workdir) if args.workdir else default / f"evomerge-{args.shape}"
    print(f"device {DEVICE}, shape {args.shape}, models in {workdir}", file=sys.stderr, flush=True)
    paths = build(args.shape, workdir)
    rows = [bench(method, paths, args.candidates) for method in ("ties", "dare_ties")]
    rows.append({"offload_agrees": offload_agrees(paths)})
    if not args.workdir:
        shutil.rmtree(workdir, ignore_errors=True)  # 54 GB of host memory when in /dev/shm
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
