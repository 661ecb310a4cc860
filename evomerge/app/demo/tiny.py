"""Tiny models the project makes itself, for the demo, tests and benchmarks.

Nothing is downloaded: configs are built here, weights are random (seeded),
and a byte-level tokenizer is written beside them. ``make_tiny_model`` saves
a random model, ``make_finetune`` a stand-in fine-tune of it; the demo's
trained base and experts (evomerge.app.demo.problem) use the same config,
tokenizer and ``save_model``.
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
    """Save ``model`` and a tokenizer (default: ``make_tokenizer()``) as a Hugging Face folder."""
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
