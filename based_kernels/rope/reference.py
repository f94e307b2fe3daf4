"""Plain-PyTorch fused RoPE + q/k/v split: the CPU path of :func:`based_kernels.rope_split_qkv` (its Triton
kernels' twin, same fp32 math), and the cos / sin tables both paths use: per token index for positions
``offset + t``, per token for explicit positions.

Everything works on the 4-D view ``qkv [s, b, ng, (G + 2) * D]`` (Megatron's grouped layout): q
``[s, b, ng * G, D]``, k, v ``[s, b, ng, D]`` come out contiguous; the backward writes dqkv of qkv's shape.
"""
from __future__ import annotations

import torch

__all__ = ["inv_freq", "rope_tables", "rope_tables_at", "fwd_torch", "bwd_torch"]

_TABLES: dict = {}
_INV_FREQ: dict = {}


def inv_freq(head_dim: int, base: float, device) -> torch.Tensor:
    """``base^(-2i / head_dim)`` for i < head_dim / 2, fp64 ``[head_dim / 2]`` on ``device``: computed on the CPU
    (the same values on every device) and cached per ``(head_dim, base, device)``. The tables below and the
    Triton kernels' in-kernel angles both multiply positions by it."""
    key = (head_dim, float(base), torch.device(device))
    hit = _INV_FREQ.get(key)
    if hit is None:
        hit = _INV_FREQ[key] = (float(base) ** (-torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)).to(
            device)
    return hit


def rope_tables_at(positions: torch.Tensor, head_dim: int, base: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``(cos, sin)`` at arbitrary integer ``positions`` (any shape, on their device): each
    ``[*positions.shape, head_dim / 2]`` fp32, angle ``pos * base^(-2i / head_dim)`` and its cos / sin computed in
    fp64 and rounded once, so exact to fp32 rounding at any position. Not cached (positions change per call)."""
    angle = positions.to(torch.float64).unsqueeze(-1) * inv_freq(head_dim, base, positions.device)
    return angle.cos().float(), angle.sin().float()


def rope_tables(s: int, offset: int, head_dim: int, base: float, device) -> tuple[torch.Tensor, torch.Tensor]:
    """``(cos, sin)`` for positions ``offset ... offset + s - 1``, each ``[s, head_dim / 2]`` fp32 contiguous:
    :func:`rope_tables_at` of those positions (Megatron's fp32 angles ``pos * inv_freq`` are off by up to
    ~ulp(pos), 2e-3 rad at position 32k). Cached per ``(s, offset, head_dim, base, device)``: a training run uses
    one entry per CP rank."""
    key = (s, offset, head_dim, base, device)
    hit = _TABLES.get(key)
    if hit is None:
        hit = rope_tables_at(torch.arange(offset, offset + s, device=device), head_dim, base)
        if len(_TABLES) >= 64:  # many distinct lengths (not a training run): start over
            _TABLES.clear()
        _TABLES[key] = hit
    return hit


def _rotate(x, cos, sin):
    """Rotate-half RoPE of ``x [s, b, ..., D]`` with tables ``[s, D/2]`` (per token index) or ``[s, b, D/2]`` (per
    token), broadcast over the other dims."""
    cos, sin = (t.view(*t.shape[:-1], *([1] * (x.dim() - t.dim())), t.shape[-1]) for t in (cos, sin))
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)


def fwd_torch(qkv, angles, G, D):
    """``angles``: ``(cos, sin, ...)`` tables ``[s, D/2]`` or ``[s, b, D/2]`` (``ops.angles``)."""
    cos, sin = angles[:2]
    s, b, ng, _ = qkv.shape
    x = qkv.unflatten(-1, (G + 2, D))
    qk = _rotate(x[:, :, :, : G + 1].to(torch.promote_types(qkv.dtype, torch.float32)), cos, sin).to(qkv.dtype)
    return qk[:, :, :, :G].reshape(s, b, ng * G, D).contiguous(), qk[:, :, :, G].contiguous(), x[:, :, :, G + 1].contiguous()


def bwd_torch(dq, dk, dv, angles, dtype):
    cos, sin = angles[:2]
    s, b, ng, D = dk.shape
    dqk = torch.cat([dq.unflatten(2, (ng, -1)), dk[:, :, :, None]], dim=3)
    dx = _rotate(dqk.to(torch.promote_types(dqk.dtype, torch.float32)), cos, -sin).to(dtype)
    return torch.cat([dx, dv[:, :, :, None].to(dtype)], dim=3).flatten(3)
