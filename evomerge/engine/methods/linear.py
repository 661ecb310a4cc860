"""Weighted averages: linear (model soups), model_stock, and passthrough."""

from __future__ import annotations

import math

import torch

from evomerge.engine.methods.base import MergeMethod, Param, TensorInputs
from evomerge.errors import EvomergeError

# Weights whose sum is this small next to the largest weight cancel out.
_CANCELLED = 1e-6


def linear(x: TensorInputs, p: dict) -> torch.Tensor:
    """sum_i w_i * x_i, divided by sum_i w_i when ``normalize``."""
    first = x.tensors[0]
    dtype = torch.float64 if first.dtype == torch.float64 else torch.float32
    weights = torch.tensor(p["weight"], dtype=dtype, device=first.device)
    out = torch.zeros_like(first, dtype=dtype)
    for t, w in zip(x.tensors, weights):
        out.addcmul_(t.to(dtype), w)
    if p["normalize"]:
        out.div_(weights.sum())
    return out.to(first.dtype)


def check_weights(name: str, p: dict) -> None:
    """Refuse weights that cancel out when ``normalize`` divides by their sum:
    the quotient would be NaN or inf, or noise scaled up by a huge factor."""
    weights = p["weight"]
    if p["normalize"] and abs(math.fsum(weights)) <= _CANCELLED * max(abs(w) for w in weights):
        listed = ", ".join(f"{w:g}" for w in weights)
        raise EvomergeError(
            f"the weights of tensor {name} ({listed}) sum to 0, so normalize: true divides by zero; "
            "change a weight or set normalize: false"
        )


def model_stock(x: TensorInputs, p: dict) -> torch.Tensor:
    """Model Stock (arXiv 2403.19522): interpolate between the base and the
    average of the fine-tunes by a ratio set from the angle between their
    task vectors."""
    base = x.base
    models = [x.tensors[i] for i in x.non_base]
    shape = base.shape
    if p["filter_wise"]:
        w0 = base.unsqueeze(0) if base.dim() == 1 else base
        ws = [m.unsqueeze(0) if m.dim() == 1 else m for m in models]
    else:
        w0 = base.reshape(-1)
        ws = [m.reshape(-1) for m in models]
    offsets = [w - w0 for w in ws]
    cosines = []
    for a_idx in range(len(offsets)):
        for b in offsets[a_idx + 1 :]:
            a = offsets[a_idx]
            norms = (torch.norm(a, dim=-1) * torch.norm(b, dim=-1)).clamp(min=1e-6)
            cosines.append(((a * b).sum(dim=-1) / norms).clamp(-1, 1))
    cos = torch.stack(cosines).mean(dim=0).unsqueeze(-1)
    n = len(ws)
    denom = 1 + (n - 1) * cos
    # Where the denominator vanishes there is no finite estimate: keep the base.
    singular = denom.abs() < 1e-6
    ratio = torch.where(singular, torch.zeros_like(cos), (n * cos) / torch.where(singular, 1, denom))
    average = sum(ws) / n
    return (ratio * average + (1 - ratio) * w0).reshape(shape)


def passthrough(x: TensorInputs, p: dict) -> torch.Tensor:
    """Copy the single input, optionally multiplied by ``scale``."""
    scale = p["scale"][0]
    t = x.tensors[0]
    return t if scale is None else t * scale


# -- the declarations ---------------------------------------------------------

LINEAR = MergeMethod(
    "linear",
    linear,
    (
        Param("weight", float, "per_input", bounds=(0.0, 1.0), doc="weight of this model"),
        Param("normalize", bool, default=True, doc="divide by the sum of the weights"),
    ),
    reference="https://arxiv.org/abs/2203.05482",
    check=check_weights,
)
MODEL_STOCK = MergeMethod(
    "model_stock",
    model_stock,
    (Param("filter_wise", bool, default=False, doc="one ratio per row instead of per tensor"),),
    base="required",
    min_inputs=3,
    reference="https://arxiv.org/abs/2403.19522",
)
PASSTHROUGH = MergeMethod(
    "passthrough",
    passthrough,
    (Param("scale", float, "per_input", default=None, bounds=(0.0, 2.0), doc="multiply the tensor"),),
    max_inputs=1,
)
METHODS = (
    LINEAR,
    MODEL_STOCK,
    PASSTHROUGH,
)
