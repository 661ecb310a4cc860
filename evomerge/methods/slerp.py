"""Spherical interpolation: slerp (base and one model) and nuslerp."""

from __future__ import annotations

import torch

from evomerge.methods.base import TensorInputs


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
