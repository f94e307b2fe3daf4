"""Causal sliding-window softmax attention (the BASED "S" mixer's core)."""
from __future__ import annotations

from .._common import resolve_backend
from .reference import sliding_window_attention_reference

__all__ = ["sliding_window_attention", "sliding_window_attention_reference"]
_ops = [None]  # the ops module


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
    if _ops[0] is None:  # imported at the first Triton call (keeps the package importable without triton)
        from . import ops

        _ops[0] = ops
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    return _ops[0].swa_triton(q, k, v, window, scale, kv_prefix, cu_seqlens)
