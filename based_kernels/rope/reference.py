"""Plain-PyTorch fused RoPE + q/k/v split: the CPU path of :func:`based_kernels.rope_split_qkv` (its Triton
kernels' twin, same fp32 math), and the cos / sin tables both paths use.

Everything works on the 4-D view ``qkv [s, b, ng, (G + 2) * D]`` (Megatron's grouped layout): q
``[s, b, ng * G, D]``, k, v ``[s, b, ng, D]`` come out contiguous; the backward writes dqkv of qkv's shape.
"""
from __future__ import annotations

import torch

__all__ = ["rope_tables", "fwd_torch", "bwd_torch"]

_TABLES: dict = {}


def rope_tables(s: int, offset: int, head_dim: int, base: float, device) -> tuple[torch.Tensor, torch.Tensor]:
    """``(cos, sin)``, each ``[s, head_dim / 2]`` fp32 contiguous: angle ``(offset + t) * base^(-2i / head_dim)``.

    The angles and their cos / sin are computed in fp64 and rounded once to fp32, so the tables are exact to fp32
    rounding at any position (Megatron's fp32 angles ``pos * inv_freq`` are off by up to ~ulp(pos), 2e-3 rad at
    position 32k). Cached per ``(s, offset, head_dim, base, device)``: a training run uses one entry per CP rank."""
    key = (s, offset, head_dim, base, device)
    hit = _TABLES.get(key)
    if hit is None:
        inv = base ** (-torch.arange(0, head_dim, 2, dtype=torch.float64, device=device) / head_dim)
        angle = torch.arange(offset, offset + s, dtype=torch.float64, device=device)[:, None] * inv
        hit = angle.cos().float(), angle.sin().float()
        if len(_TABLES) >= 64:  # many distinct lengths (not a training run): start over
            _TABLES.clear()
        _TABLES[key] = hit
    return hit


def _rotate(x, cos, sin):
    """Rotate-half RoPE of ``x [s, ..., D]`` with tables ``[s, D/2]`` (broadcast over the middle dims)."""
    cos, sin = (t.view(t.shape[0], *([1] * (x.dim() - 2)), t.shape[1]) for t in (cos, sin))
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)


def fwd_torch(qkv, cos, sin, G, D):
    s, b, ng, _ = qkv.shape
    x = qkv.unflatten(-1, (G + 2, D))
    qk = _rotate(x[:, :, :, : G + 1].to(torch.promote_types(qkv.dtype, torch.float32)), cos, sin).to(qkv.dtype)
    return qk[:, :, :, :G].reshape(s, b, ng * G, D).contiguous(), qk[:, :, :, G].contiguous(), x[:, :, :, G + 1].contiguous()


def bwd_torch(dq, dk, dv, cos, sin, dtype):
    s, b, ng, D = dk.shape
    dqk = torch.cat([dq.unflatten(2, (ng, -1)), dk[:, :, :, None]], dim=3)
    dx = _rotate(dqk.to(torch.promote_types(dqk.dtype, torch.float32)), cos, -sin).to(dtype)
    return torch.cat([dx, dv[:, :, :, None].to(dtype)], dim=3).flatten(3)
