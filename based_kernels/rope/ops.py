"""The functional API of the fused RoPE + q/k/v split (checks, backend dispatch), its launchers, autograd
Function (eager) and ``torch.library`` custom ops (torch.compile).

Everything works on the 4-D view ``qkv [s, b, ng, (G + 2) * D]`` (Megatron's grouped layout, last dim contiguous,
any other strides): q ``[s, b, ng * G, D]``, k, v ``[s, b, ng, D]`` come out contiguous; the backward reads dq, dk,
dv with any strides (last dim contiguous) and writes a contiguous dqkv of qkv's shape. Triton kernels on CUDA (or
under ``TRITON_INTERPRET=1``); ``reference.py``'s ``*_torch`` functions are the same math in PyTorch (the CPU path),
with the cos / sin tables both paths share.
"""
from __future__ import annotations

import torch

from .._common import Launcher, cdiv, next_pow2, resolve_backend
from .kernels import rope_bwd_kernel, rope_fwd_kernel
from .reference import bwd_torch, fwd_torch, rope_tables

_fwd, _bwd = Launcher(rope_fwd_kernel), Launcher(rope_bwd_kernel)

__all__ = ["rope_split_qkv", "rope_tables", "RopeSplitQKVFunction", "rope_split_qkv_fwd_op",
           "rope_split_qkv_bwd_op"]


# ------------------------------------------------------------------------------------------- the functional API
_TRITON_DTYPES = (torch.bfloat16, torch.float16, torch.float32)


def rope_split_qkv(qkv: torch.Tensor, num_query_groups: int, head_dim: int, *, offset: int = 0,
                   base: float = 10000.0, backend=None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Split Megatron's packed ``linear_qkv`` output into q, k, v and apply RoPE to q and k.

    qkv ``[s, b, ng, (G + 2) * d_h]`` (or its flat ``[s, b, ng * (G + 2) * d_h]``) in Megatron's grouped layout:
    per query group g, its G query heads, then its key head, then its value head (MHA: G = 1, ``[q_h | k_h | v_h]``
    per head). Last dim contiguous (else one copy), other strides free. Token t (of every batch row) is at position
    ``offset + t`` (contiguous context-parallel shards: ``offset = cp_rank * s``).

    Returns q ``[s, b, ng * G, d_h]``, k ``[s, b, ng, d_h]``, v ``[s, b, ng, d_h]``, new contiguous tensors in
    qkv's dtype: q and k rotated with Megatron's non-interleaved (rotate-half) RoPE at angles
    ``pos * base^(-2i / d_h)`` (fp32 math from fp32 cos / sin tables, rounded once), v copied. The gradient of qkv
    is contiguous, in qkv's dtype. d_h must be even (any even size; not only powers of two).
    backend: None (Triton for CUDA tensors, PyTorch otherwise, or ``based_kernels.use_backend``), "triton",
    "torch".
    """
    if qkv.dim() not in (3, 4):
        raise ValueError(f"qkv must be [s, b, ng, (G + 2) * head_dim] or [s, b, ng * (G + 2) * head_dim]; got "
                         f"{tuple(qkv.shape)}")
    if not qkv.is_floating_point():
        raise TypeError(f"qkv must be floating point; got {qkv.dtype}")
    if head_dim < 2 or head_dim % 2:
        raise ValueError(f"head_dim ({head_dim}) must be even: rotate-half RoPE pairs dims i and i + head_dim / 2")
    if num_query_groups < 1 or (qkv.dim() == 4 and qkv.shape[2] != num_query_groups):
        raise ValueError(f"num_query_groups ({num_query_groups}) must be >= 1 and match qkv's dim 2 "
                         f"{tuple(qkv.shape)}")
    width = qkv.shape[-1] * (qkv.shape[2] if qkv.dim() == 4 else 1)  # ng * (G + 2) * head_dim
    G = width // (num_query_groups * head_dim) - 2
    if G < 1 or width != num_query_groups * (G + 2) * head_dim:
        raise ValueError(f"qkv's last dim(s) {tuple(qkv.shape[2:])} must hold num_query_groups ({num_query_groups}) "
                         f"x (G + 2) x head_dim ({head_dim}) with G >= 1 query heads per group")
    if not isinstance(offset, (int, torch.SymInt)) or offset < 0:
        raise ValueError(f"offset must be an int >= 0 (the position of token 0); got {offset!r}")
    if qkv.stride(-1) != 1:
        qkv = qkv.contiguous()
    if qkv.dim() == 3:
        qkv = qkv.unflatten(-1, (num_query_groups, -1))
    use_triton = resolve_backend(backend, qkv) == "triton" and qkv.numel() > 0
    if use_triton and qkv.dtype not in _TRITON_DTYPES:
        raise TypeError(f"the Triton RoPE takes {_TRITON_DTYPES} qkv; got {qkv.dtype} (use backend='torch')")
    if use_triton and torch.compiler.is_compiling():
        return rope_split_qkv_fwd_op(qkv, G, head_dim, offset, float(base))
    return RopeSplitQKVFunction.apply(qkv, G, head_dim, offset, float(base), use_triton)


# ------------------------------------------------------------------------------------- the two passes in Triton
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
