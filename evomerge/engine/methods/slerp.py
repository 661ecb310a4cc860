"""Spherical interpolation: slerp (base and one model), nuslerp, multislerp
(several models, weighted) and karcher (the Karcher mean on the sphere)."""

from __future__ import annotations

import math

import torch

from evomerge.engine.methods.base import MergeMethod, Param, TensorInputs
from evomerge.errors import EvomergeError


def slerp_tensors(t: float, v0: torch.Tensor, v1: torch.Tensor, dot_threshold: float = 0.9995, eps: float = 1e-8):
    """Slerp between two whole tensors treated as flat vectors.

    Falls back to linear interpolation when the vectors are (anti)collinear,
    where the spherical formula divides by sin(theta) ~ 0.
    """
    dtype = torch.float64 if v0.dtype == torch.float64 else torch.float32
    a = v0.reshape(-1).to(dtype)
    b = v1.reshape(-1).to(dtype)
    # t as a tensor of the working dtype, as mergekit has it: 1 - t then rounds
    # as mergekit's does (a Python float would round 1 - t in double first).
    t = torch.tensor(t, dtype=dtype, device=a.device)
    norm_a = torch.linalg.vector_norm(a)
    norm_b = torch.linalg.vector_norm(b)
    norm_a = torch.where(norm_a > eps, norm_a, 1)
    norm_b = torch.where(norm_b > eps, norm_b, 1)
    dot = ((a / norm_a) * (b / norm_b)).sum().clamp(-1, 1)
    if dot.abs() > dot_threshold:
        out = (1 - t) * a + t * b
    else:
        theta = torch.acos(dot)
        sin_theta = torch.sin(theta)
        out = (torch.sin((1 - t) * theta) / sin_theta) * a + (torch.sin(t * theta) / sin_theta) * b
    return out.reshape(v0.shape).to(v0.dtype)


def slerp(x: TensorInputs, p: dict) -> torch.Tensor:
    """Interpolate from the base (t=0) to the other model (t=1)."""
    other = x.non_base[0]
    return slerp_tensors(p["t"], x.base, x.tensors[other])


def _nuslerp(t: float, v0: torch.Tensor, v1: torch.Tensor, row_wise: bool, flatten: bool, eps: float = 1e-8):
    shape = v0.shape
    if flatten:
        v0, v1 = v0.reshape(-1), v1.reshape(-1)
    elif row_wise:
        v0, v1 = v0.transpose(0, -1), v1.transpose(0, -1)
    u0 = v0 / torch.norm(v0, dim=-1, keepdim=True).clamp(min=1e-7)
    u1 = v1 / torch.norm(v1, dim=-1, keepdim=True).clamp(min=1e-7)
    cos = (u0 * u1).sum(dim=-1, keepdim=True).clamp(-1, 1)
    collinear = (1 - cos.square()) <= eps**2
    theta = torch.acos(torch.where(collinear, 0, cos))
    spherical = (torch.sin((1 - t) * theta) * v0 + torch.sin(t * theta) * v1) / torch.sin(theta)
    out = torch.where(collinear, (1 - t) * v0 + t * v1, spherical)
    if row_wise and not flatten:
        out = out.transpose(0, -1)
    return out.reshape(shape)


def nuslerp(x: TensorInputs, p: dict) -> torch.Tensor:
    """Slerp between two models (or their task vectors, given a base), with
    t = w1 / (w0 + w1), optionally row by row instead of over the flat tensor."""
    i0, i1 = x.non_base
    w0, w1 = p["weight"]
    total = w0 + w1
    t = 0.5 if abs(total) < 1e-6 else w1 / total
    row_wise, flatten = p["nuslerp_row_wise"], p["nuslerp_flatten"]
    if x.base_index is None:
        return _nuslerp(t, x.tensors[i0], x.tensors[i1], row_wise, flatten)
    return x.base + _nuslerp(t, x.delta(i0), x.delta(i1), row_wise, flatten)


def multislerp(x: TensorInputs, p: dict) -> torch.Tensor:
    """Barycentric interpolation on the hypersphere (mergekit's multislerp).

    Each model's tensor (its task vector, given a base) is flattened and
    scaled to unit length. Their weighted mean, renormalized, is the point
    in whose tangent space the weighted tangent directions are summed; the
    exponential map takes that sum back to the sphere, and the result is
    scaled by the weighted mean of the norms. The arithmetic is done in the
    compute dtype with stacked reductions, as mergekit's (same bits).
    """
    models = x.non_base
    if len(models) == 1:
        return x.tensors[models[0]]
    has_base = x.base_index is not None
    stacked = torch.stack([x.delta(i) if has_base else x.tensors[i] for i in models])
    flat = stacked.reshape(len(models), -1)
    eps = p["eps"]
    w = torch.tensor(p["weight"], dtype=flat.dtype, device=flat.device)
    if p["normalize_weights"]:
        w = w / w.sum()
    column = w.view(-1, 1)
    norms = torch.linalg.vector_norm(flat, dim=-1, keepdim=True)
    units = flat / (norms + eps)
    centre = (units * column).sum(0)
    centre_norm = torch.linalg.vector_norm(centre)
    if centre_norm < eps:
        if len(models) != 2:
            raise EvomergeError(
                f"multislerp: the weighted directions of tensor {x.name} cancel out (opposite models whose "
                "weights balance); change the weights"
            )
        # Two opposite directions: their weighted sum instead, as in mergekit.
        out = (stacked[0] * w[0] + stacked[1] * w[1]).reshape(stacked.shape[1:])
    else:
        centre = centre / centre_norm
        along = (units * centre).sum(-1, keepdim=True)
        step = ((units - along * centre) * column).sum(0)
        length = torch.linalg.vector_norm(step) + eps
        on_sphere = centre * torch.cos(length) + step * (torch.sin(length) / length)
        out = (on_sphere * (norms.squeeze(-1) * w).sum()).reshape(stacked.shape[1:])
    return out + x.base if has_base else out


def check_multislerp_weights(name: str, p: dict) -> None:
    """Refuse weights that sum to 0 when ``normalize_weights`` divides by their sum."""
    weights = p["weight"]
    if p["normalize_weights"] and abs(math.fsum(weights)) <= 1e-6 * max(abs(w) for w in weights):
        listed = ", ".join(f"{w:g}" for w in weights)
        raise EvomergeError(
            f"the weights of tensor {name} ({listed}) sum to 0, so normalize_weights: true divides by zero; "
            "change a weight or set normalize_weights: false"
        )


def karcher(x: TensorInputs, p: dict) -> torch.Tensor:
    """The Karcher (Riemannian) mean of the inputs' directions on the unit
    sphere, every input weighted equally, scaled by the mean of their norms.

    As mergekit's karcher: at most ``max_iter`` Riemannian gradient steps,
    stopping once a step is shorter than ``tol``; inputs whose norm is
    ``tol`` or less take no part in the direction (but do in the scale).
    Norms are taken in float32 (float64 for float64 tensors).
    """
    tensors = x.tensors
    n = len(tensors)
    if n == 1:
        return tensors[0]
    tol = p["tol"]
    wide = torch.float64 if tensors[0].dtype == torch.float64 else torch.float32

    def norm(t: torch.Tensor) -> torch.Tensor:
        return torch.linalg.vector_norm(t.to(wide))

    norms = [norm(t) for t in tensors]
    used = [i for i in range(n) if norms[i].item() > tol]
    if not used:
        return torch.zeros_like(tensors[0])
    # The equal weights, renormalized over the inputs used, summed in Python
    # from 0 in input order as mergekit does.
    total = 0
    for _ in used:
        total = total + 1.0 / n
    shares = [(1.0 / n) / total for _ in used]
    units = [(tensors[i] / norms[i]).to(tensors[i].dtype) for i in used]

    mean = torch.zeros_like(units[0])
    for a, u in zip(shares, units):
        mean += a * u
    length = norm(mean)
    mean = units[0].clone() if length.item() < tol else (mean / length).to(mean.dtype)
    for _ in range(p["max_iter"]):
        step = torch.zeros_like(mean)
        for a, u in zip(shares, units):
            cos = torch.clamp(torch.dot(mean.reshape(-1), u.reshape(-1)), -1.0, 1.0)
            angle = torch.arccos(cos)
            if angle.item() < tol:
                continue
            step += a * (angle / torch.sin(angle)) * (u - cos * mean)
        step_length = norm(step)
        if step_length.item() < tol:
            break
        mean = (torch.cos(step_length) * mean + torch.sin(step_length) * (step / step_length)).to(mean.dtype)
        length = norm(mean)
        if length.item() > tol:
            mean = (mean / length).to(mean.dtype)
    scale = 0
    for r in norms:
        scale = scale + (1.0 / n) * r
    return scale * mean


# -- the declarations ---------------------------------------------------------

SLERP = MergeMethod(
    "slerp",
    slerp,
    (Param("t", float, bounds=(0.0, 1.0), doc="0 gives the base, 1 the other model"),),
    base="required",
    min_inputs=2,
    max_inputs=2,
    base_is_endpoint=True,
)
NUSLERP = MergeMethod(
    "nuslerp",
    nuslerp,
    (
        Param("weight", float, "per_model", bounds=(0.0, 1.0), doc="relative weight of this model"),
        Param("nuslerp_row_wise", bool, default=False, doc="slerp columns instead of rows"),
        Param("nuslerp_flatten", bool, default=True, doc="slerp the whole tensor as one vector"),
    ),
    base="optional",
    exact_non_base=2,
)
MULTISLERP = MergeMethod(
    "multislerp",
    multislerp,
    (
        Param("weight", float, "per_model", bounds=(0.0, 1.0), doc="weight of this model"),
        Param("normalize_weights", bool, default=True, doc="divide the weights by their sum"),
        Param(
            "eps",
            float,
            default=1e-8,
            limits=(0.0, math.inf),
            open_low=True,
            doc="added to norms against division by zero",
        ),
    ),
    base="optional",
    min_non_base=1,
    reference="https://goddard.blog/posts/multislerp-wow-what-a-cool-idea",
    check=check_multislerp_weights,
)
KARCHER = MergeMethod(
    "karcher",
    karcher,
    (
        Param("max_iter", int, default=10, limits=(0, math.inf), doc="most Riemannian steps taken"),
        Param("tol", float, default=1e-5, limits=(0.0, math.inf), doc="stop once a step is shorter"),
    ),
    reference="https://arxiv.org/abs/2603.04972",
)
METHODS = (
    SLERP,
    NUSLERP,
    MULTISLERP,
    KARCHER,
)
