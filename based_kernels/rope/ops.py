"""cos / sin tables, launchers, autograd and ``torch.library`` custom ops of the fused RoPE + q/k/v split.

Everything works on the 4-D view ``qkv [s, b, ng, (G + 2) * D]`` (Megatron's grouped layout, last dim contiguous,
any other strides): q ``[s, b, ng * G, D]``, k, v ``[s, b, ng, D]`` come out contiguous; the backward reads dq, dk,
dv with any strides (last dim contiguous) and writes a contiguous dqkv of qkv's shape. Triton kernels on CUDA (or
under ``TRITON_INTERPRET=1``); the ``*_torch`` functions are the same math in PyTorch (the CPU path).
"""
from __future__ import annotations

import torch

from .._common import Launcher, cdiv, next_pow2
from .kernels import rope_bwd_kernel, rope_fwd_kernel

_fwd, _bwd = Launcher(rope_fwd_kernel), Launcher(rope_bwd_kernel)

__all__ = ["rope_tables", "RopeSplitQKVFunction", "rope_split_qkv_fwd_op", "rope_split_qkv_bwd_op"]

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


# --------------------------------------------------------------------------------------------------- the two passes
def _grid(N, ng):
    return lambda meta: (cdiv(N, meta["BLOCK_N"]), ng)


def fwd_triton(qkv, cos, sin, G, D):
    s, b, ng, _ = qkv.shape
    q = qkv.new_empty(s, b, ng * G, D)
    k, v = qkv.new_empty(s, b, ng, D), qkv.new_empty(s, b, ng, D)
    st, sb, sg, _ = qkv.stride()
    _fwd(_grid(s * b, ng), (qkv, cos, sin, q, k, v, st, sb, sg, s * b, b, ng),
         G=G, D=D, BLOCK_H=next_pow2(D // 2))
    return q, k, v


def bwd_triton(dq, dk, dv, cos, sin, dtype):
    s, b, ng, D = dk.shape
    G = dq.shape[2] // ng
    dqkv = torch.empty(s, b, ng, (G + 2) * D, dtype=dtype, device=dq.device)
    dq, dk, dv = (t if t.stride(-1) == 1 else t.contiguous() for t in (dq, dk, dv))
    _bwd(_grid(s * b, ng), (dq, dk, dv, cos, sin, dqkv, *dq.stride()[:3], *dk.stride()[:3], *dv.stride()[:3],
                            *dqkv.stride()[:3], s * b, b),
         G=G, D=D, BLOCK_H=next_pow2(D // 2))
    return dqkv


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


# -------------------------------------------------------------------------------------------------- eager autograd
class RopeSplitQKVFunction(torch.autograd.Function):
    """Eager path: ``apply(qkv, G, D, offset, base, use_triton) -> (q, k, v)``, qkv the 4-D view. Saves no
    tensor: the backward needs only the (cached) tables and qkv's dtype."""

    @staticmethod
    def forward(ctx, qkv, G, D, offset, base, use_triton):
        cos, sin = rope_tables(qkv.shape[0], offset, D, base, qkv.device)
        ctx.tables, ctx.dtype, ctx.use_triton = (cos, sin), qkv.dtype, use_triton
        return (fwd_triton if use_triton else fwd_torch)(qkv, cos, sin, G, D)

    @staticmethod
    def backward(ctx, dq, dk, dv):
        dqkv = (bwd_triton if ctx.use_triton else bwd_torch)(dq, dk, dv, *ctx.tables, ctx.dtype)
        return dqkv, None, None, None, None, None


# ------------------------------------------------------------------------- torch.compile path: opaque custom ops
@torch.library.custom_op("based_kernels::rope_split_qkv_fwd", mutates_args=())
def rope_split_qkv_fwd_op(qkv: torch.Tensor, G: int, D: int, offset: int,
                          base: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return fwd_triton(qkv, *rope_tables(qkv.shape[0], offset, D, base, qkv.device), G, D)


@rope_split_qkv_fwd_op.register_fake
def _(qkv, G, D, offset, base):
    s, b, ng, _ = qkv.shape
    return qkv.new_empty(s, b, ng * G, D), qkv.new_empty(s, b, ng, D), qkv.new_empty(s, b, ng, D)


@torch.library.custom_op("based_kernels::rope_split_qkv_bwd", mutates_args=())
def rope_split_qkv_bwd_op(dq: torch.Tensor, dk: torch.Tensor, dv: torch.Tensor, offset: int, base: float,
                          dtype: torch.dtype) -> torch.Tensor:
    D = dk.shape[-1]
    return bwd_triton(dq, dk, dv, *rope_tables(dk.shape[0], offset, D, base, dk.device), dtype)


@rope_split_qkv_bwd_op.register_fake
def _(dq, dk, dv, offset, base, dtype):
    s, b, ng, D = dk.shape
    return dk.new_empty(s, b, ng, (dq.shape[2] // ng + 2) * D, dtype=dtype)


def _setup_context(ctx, inputs, output):
    qkv, _, _, ctx.offset, ctx.base = inputs
    ctx.dtype = qkv.dtype


def _backward(ctx, dq, dk, dv):
    return rope_split_qkv_bwd_op(dq, dk, dv, ctx.offset, ctx.base, ctx.dtype), None, None, None, None


torch.library.register_autograd("based_kernels::rope_split_qkv_fwd", _backward, setup_context=_setup_context)
