"""Causal sliding-window softmax attention (the BASED "S" mixer's core)."""
from __future__ import annotations

from .reference import sliding_window_attention_reference

__all__ = ["sliding_window_attention", "sliding_window_attention_reference"]


def sliding_window_attention(q, k, v, *, window, scale=None, cu_seqlens=None, kv_prefix=None):
    """Causal left-window softmax attention. q ``[B, T, H, D]``, k/v ``[B, T, H_kv, D]``; see the reference."""
    return sliding_window_attention_reference(q, k, v, window=window, scale=scale, cu_seqlens=cu_seqlens,
                                              kv_prefix=kv_prefix)
