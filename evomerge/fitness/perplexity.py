"""The perplexity objective: a text file tokenized once, cut into chunks, and
the live model's mean next-token negative log-likelihood over them."""

from __future__ import annotations

from pathlib import Path

import torch

from evomerge.errors import EvomergeError

PERPLEXITY_MAX_LENGTH = 512  # tokens per perplexity chunk, at most
PERPLEXITY_MAX_TOKENS = 65536  # tokens scored per perplexity file when `samples` is not set
_LOGITS_BUDGET = 2**28  # logits elements per perplexity forward pass (1 GiB in float32)


def read_tokens(path: Path, ref: str, tokenizer) -> torch.Tensor:
    """The token ids of the perplexity file ``ref`` (found at ``path``)."""
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise EvomergeError(f"perplexity file {ref!r} is not UTF-8 text; convert it to UTF-8") from None
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    if len(ids) < 2:
        raise EvomergeError(f"perplexity file {ref!r} has {len(ids)} tokens; give it some text")
    return torch.tensor(ids, dtype=torch.long)  # (N,) the whole file


def chunks(ids: torch.Tensor, model: torch.nn.Module, samples: int | None) -> list[torch.Tensor]:
    """The token chunks a perplexity objective scores: consecutive pieces of
    ``min(model max positions, PERPLEXITY_MAX_LENGTH)`` tokens (the last may
    be shorter), the first ``samples`` of them, or up to
    ``PERPLEXITY_MAX_TOKENS`` tokens when ``samples`` is not set."""
    limit = getattr(model.config, "max_position_embeddings", None) or PERPLEXITY_MAX_LENGTH
    length = min(limit, PERPLEXITY_MAX_LENGTH)
    count = samples or max(1, PERPLEXITY_MAX_TOKENS // length)
    pieces = [ids[i : i + length] for i in range(0, len(ids), length)][:count]
    return [p for p in pieces if len(p) >= 2]


@torch.inference_mode()
def mean_nll(model: torch.nn.Module, pieces: list[torch.Tensor], device, batch_size: int) -> float:
    """Mean next-token negative log-likelihood of ``model`` over ``pieces``."""
    vocab = getattr(model.config, "vocab_size", None) or 2**17
    total = torch.zeros((), dtype=torch.float64)
    n_tokens = 0
    i = 0
    while i < len(pieces):
        # Equal-length chunks go through together; the logits (B, T, V) are
        # the largest tensor, so their size bounds the batch.
        length = len(pieces[i])
        rows = max(1, min(batch_size, _LOGITS_BUDGET // (length * vocab)))
        batch = [pieces[i]]
        while len(batch) < rows and i + len(batch) < len(pieces) and len(pieces[i + len(batch)]) == length:
            batch.append(pieces[i + len(batch)])
        i += len(batch)
        x = torch.stack(batch).to(device)  # (B, T)
        logits = model(input_ids=x, use_cache=False).logits.float()  # (B, T, V)
        loss = torch.nn.functional.cross_entropy(
            logits[:, :-1].reshape(-1, logits.shape[-1]), x[:, 1:].reshape(-1), reduction="sum"
        )
        total += loss.double().cpu()
        n_tokens += x.shape[0] * (length - 1)
    return float(total) / n_tokens


__all__ = ["PERPLEXITY_MAX_LENGTH", "PERPLEXITY_MAX_TOKENS", "chunks", "mean_nll", "read_tokens"]
