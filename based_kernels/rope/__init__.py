"""Fused RoPE + q/k/v split of a packed attention projection: one read of qkv forward, one write of dqkv backward."""
from __future__ import annotations

import torch

from .._common import resolve_backend

__all__ = ["rope_split_qkv"]

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
    from .ops import RopeSplitQKVFunction, rope_split_qkv_fwd_op

    if use_triton and torch.compiler.is_compiling():
        return rope_split_qkv_fwd_op(qkv, G, head_dim, offset, float(base))
    return RopeSplitQKVFunction.apply(qkv, G, head_dim, offset, float(base), use_triton)
