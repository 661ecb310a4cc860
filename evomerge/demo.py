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


def run_demo(workdir: Path) -> int:
    """Build (once) a tiny base and two fine-tunes, merge them with a layer-wise
    TIES recipe to disk and in place, and show that both agree."""
    import time

    import torch
    from safetensors.torch import load_file

    from evomerge.merge import InPlaceMerger, merge_to_disk
    from evomerge.recipe import Recipe

    workdir = Path(workdir)
    models = workdir / "models"
    if not (models / "expert_b" / "config.json").is_file():
        print(f"building demo models in {models} ...")
        base = make_tiny_model(models / "base", arch="llama", seed=0, layers=4)
        make_finetune(base, models / "expert_a", seed=1)
        make_finetune(base, models / "expert_b", seed=2)
    recipe = Recipe.from_dict(
        {
            "method": "ties",
            "base_model": "models/base",
            "sources": [
                {"model": "models/expert_a", "parameters": {"weight": [0.8, 0.4], "density": 0.6}},
                {"model": "models/expert_b", "parameters": {"weight": [0.3, 0.9], "density": 0.6}},
            ],
            "dtype": "float32",
            "seed": 0,
        }
    )
    (workdir / "recipe.yaml").write_text(recipe.to_yaml())
    t0 = time.perf_counter()
    out = merge_to_disk(recipe, workdir / "merged", root=workdir, overwrite=True)
    disk_s = time.perf_counter() - t0
    merger = InPlaceMerger(recipe, root=workdir)
    t0 = time.perf_counter()
    model = merger.apply(recipe)
    inplace_s = time.perf_counter() - t0
    on_disk = load_file(out / "model.safetensors")
    live = model.state_dict()
    same = all(torch.equal(live[k], v) for k, v in on_disk.items())
    print(f"recipe     {workdir / 'recipe.yaml'} (fingerprint {recipe.fingerprint()[:12]})")
    print(f"to disk    {out}  {disk_s:.2f}s, {len(on_disk)} tensors")
    print(f"in place   {inplace_s * 1000:.1f} ms per candidate; identical to disk: {same}")
    return 0 if same else 1
