"""Tiny models the project makes itself, for the demo, tests and benchmarks.

Nothing is downloaded: configs are built here, weights are random (seeded),
and a character-level tokenizer is written beside them.
"""

from __future__ import annotations

from pathlib import Path

ARCHS = ("llama", "qwen2")
_SPECIALS = ["<pad>", "<s>", "</s>", "<unk>"]


def _byte_alphabet() -> list[str]:
    from tokenizers import pre_tokenizers

    return sorted(pre_tokenizers.ByteLevel.alphabet())


def make_tokenizer():
    """A byte-level tokenizer with no merges: one token per byte.

    Byte-level BPE (rather than a plain character vocabulary) because
    transformers rebuilds some model types' tokenizers (Qwen2's, for one)
    around a byte-level pre-tokenizer; this vocabulary survives that.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate(_SPECIALS + _byte_alphabet())}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>", unk_token="<unk>"
    )


VOCAB_SIZE = len(_SPECIALS) + 256


def tiny_config(arch: str = "llama", layers: int = 4, hidden: int = 64, tie: bool | None = None, **overrides):
    """A transformers config for a tiny Llama (untied, grouped-query attention)
    or Qwen2 (attention biases, tied embeddings) model."""
    import transformers

    common = dict(
        vocab_size=VOCAB_SIZE,
        hidden_size=hidden,
        intermediate_size=hidden * 2,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )
    common.update(overrides)
    if arch == "llama":
        return transformers.LlamaConfig(tie_word_embeddings=bool(tie), **common)
    if arch == "qwen2":
        return transformers.Qwen2Config(tie_word_embeddings=True if tie is None else tie, **common)
    raise ValueError(f"unknown arch {arch!r}; use one of {ARCHS}")


def save_model(model, out: Path, tokenizer=None) -> Path:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, safe_serialization=True)
    (tokenizer or make_tokenizer()).save_pretrained(out)
    return out


def make_tiny_model(out: Path, arch: str = "llama", seed: int = 0, dtype: str = "float32", **config_kwargs) -> Path:
    """Save a randomly initialised tiny model (weights drawn from ``seed``)."""
    import torch
    import transformers

    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(tiny_config(arch, **config_kwargs))
    return save_model(model.to(getattr(torch, dtype)), out)


def make_finetune(base: Path, out: Path, seed: int, scale: float = 0.02) -> Path:
    """A stand-in fine-tune: the base plus a seeded random task vector whose
    entries are ``scale`` times the base tensor's standard deviation."""
    import torch
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(base)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            std = float(p.float().std()) if p.numel() > 1 else 1.0
            p.add_(torch.randn(p.shape, generator=g).to(p.dtype) * (scale * (std or 1.0)))
    return save_model(model, out)


# The demo's search: what the README's first command runs.
DEMO_SPACE = "ties_layerwise"
DEMO_DRIVER = {"name": "cma", "popsize": 8, "sigma0": 0.2}
DEMO_TRIALS = 200


def demo_config(workdir: Path) -> Path:
    """Write the demo's search config (models and tasks from ``build_demo``)."""
    import yaml

    from evomerge.demo_problem import build_demo

    workdir = Path(workdir).resolve()
    assets = build_demo(workdir)
    rel = lambda p: str(Path(p).relative_to(workdir))  # noqa: E731
    config = {
        "base_model": rel(assets.base),
        "models": [rel(p) for p in assets.experts],
        "space": DEMO_SPACE,
        "dtype": "float32",
        "seed": 0,
        "eval": {
            "include_path": rel(assets.tasks_dir),
            "batch_size": 64,
            "objectives": [{"task": t, "metric": "acc"} for t in assets.dev_tasks],
        },
        "heldout": {
            "include_path": rel(assets.tasks_dir),
            "batch_size": 64,
            "objectives": [{"task": t, "metric": "acc"} for t in assets.heldout_tasks],
        },
        "budget": {"trials": DEMO_TRIALS},
        "driver": DEMO_DRIVER,
    }
    path = workdir / "search.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def run_demo(workdir: Path, progress: bool = True) -> int:
    """Build (once) a tiny base and two experts on different synthetic skills,
    search for the best merge, and compare it with the sources and the
    default merges on the held-out split."""
    from evomerge.export import export_best, status_table
    from evomerge.search import Run, open_study, trial_attrs

    workdir = Path(workdir)
    config = demo_config(workdir)
    run_dir = workdir / "run"
    run = Run(config, run_dir, progress=progress, force=True)
    try:
        run.search()
    finally:
        run.close()
    print(status_table(run_dir, top=5))
    out, recipe = export_best(run_dir, out=workdir / "best_recipe.yaml")

    study, _ = open_study(run_dir)
    rows = []
    for t in study.get_trials(deepcopy=False):
        a = trial_attrs(study, t)
        if "heldout_fitness" in a and a.get("status") == "ok":
            what = a["name"] if a.get("kind") == "baseline" else f"evolved (trial {t.number})"
            rows.append((what, a.get("kind"), a["fitness"], a["heldout_fitness"], a["heldout"]))
    n = len(rows[0][4]) if rows else 1
    print(f"\nheld-out accuracy (mean over {n} skills; the search never saw these documents):")
    for what, _, dev, held, per in rows:
        skills = "  ".join(f"{k.split('/')[0]} {v:.3f}" for k, v in per.items())
        print(f"  {what:<28} held-out {held / n:.3f}   dev {dev / n:.3f}   {skills}")
    sources = [r for r in rows if r[0].startswith("source")]
    defaults = [r for r in rows if r[1] == "baseline" and not r[0].startswith("source")]
    evolved = [r for r in rows if r[1] == "search"]
    print(f"\nbest recipe: {out}")
    if not (sources and defaults and evolved):
        print("the best recipe is a baseline: the search did not beat it on the dev set")
        return 1
    best_source = max(sources, key=lambda r: r[3])
    best_default = max(defaults, key=lambda r: r[3])
    held = evolved[0][3]
    print(
        f"evolved {held / n:.3f} vs best source {best_source[3] / n:.3f} ({best_source[0]}) "
        f"and best default merge {best_default[3] / n:.3f} ({best_default[0]}) on held-out"
    )
    return 0 if held > best_source[3] and held > best_default[3] else 1
