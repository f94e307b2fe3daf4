"""Causal sliding-window softmax attention (the BASED "S" mixer's core)."""
from __future__ import annotations

from .._common import resolve_backend
from .reference import sliding_window_attention_reference

__all__ = ["sliding_window_attention", "sliding_window_attention_reference"]


def sliding_window_attention(q, k, v, *, window, scale=None, cu_seqlens=None, kv_prefix=None, backend=None):
    """Causal left-window softmax attention: query t attends keys ``t - window ... t`` (window + 1 keys).

    Args:
        q: ``[B, T, H, D]``; k, v: ``[B, T, H_kv, D]`` with H a multiple of H_kv (GQA). Any strides with a
            contiguous last dim (e.g. Megatron's ``[s, b, h, d]`` transposed to ``[b, s, h, d]``).
        window: left window W >= 0.
        scale: softmax scale, default ``D ** -0.5``.
        cu_seqlens: ``[N + 1]`` document offsets for packed documents (B = 1); no attention across them.
        kv_prefix: ``(k_prefix, v_prefix)`` ``[B, P, H_kv, D]`` rows at positions -P ... -1 (the context-parallel
            halo); gradients flow back to them.
        backend: None (Triton for CUDA tensors, PyTorch otherwise), "triton" (also runs on CPU tensors under
            ``TRITON_INTERPRET=1``) or "torch" (the dense reference).
    Returns:
        o ``[B, T, H, D]`` in q's dtype (token-major in memory when q is).
    """
    if resolve_backend(backend, q) == "torch":
        return sliding_window_attention_reference(q, k, v, window=window, scale=scale, cu_seqlens=cu_seqlens,
                                                  kv_prefix=kv_prefix)
    if window < 0:
        raise ValueError(f"window must be >= 0, got {window}")
    if q.dim() != 4 or k.dim() != 4 or k.shape != v.shape or k.shape[:2] != q.shape[:2] or k.shape[3] != q.shape[3]:
        raise ValueError(f"expected q [B, T, H, D] and k, v [B, T, H_kv, D]; got q {tuple(q.shape)}, "
                         f"k {tuple(k.shape)}, v {tuple(v.shape)}")
    if q.shape[2] % k.shape[2]:
        raise ValueError(f"query heads ({q.shape[2]}) must be a multiple of key/value heads ({k.shape[2]})")
    if q.shape[3] > 256:
        raise ValueError(f"head dim {q.shape[3]} > 256 is not supported by the Triton kernel; use backend='torch'")
    if cu_seqlens is not None:
        if kv_prefix is not None:
            raise ValueError("kv_prefix and cu_seqlens cannot be combined")
        if q.shape[0] != 1:
            raise ValueError(f"cu_seqlens needs batch size 1 (documents packed along T); got B={q.shape[0]}")
    if kv_prefix is not None:
        kp, vp = kv_prefix
        if kp.shape != vp.shape or kp.shape[0] != k.shape[0] or kp.shape[2:] != k.shape[2:]:
            raise ValueError(f"kv_prefix must be two [B, P, H_kv, D] tensors matching k {tuple(k.shape)}; got "
                             f"{tuple(kp.shape)}, {tuple(vp.shape)}")
    from .ops import swa_triton

    scale = q.shape[-1] ** -0.5 if scale is None else scale
    return swa_triton(q, k, v, window=window, scale=scale, kv_prefix=kv_prefix, cu_seqlens=cu_seqlens)
