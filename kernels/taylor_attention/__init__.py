"""Taylor (2nd-order) linear attention, the BASED "L" mixer's core.

Public API: :func:`taylor_linear_attention` (parallel form) and :func:`taylor_linear_attention_step`
(one-token decode). On CUDA tensors they run Triton kernels once those exist; on CPU the chunked PyTorch path.
"""
from __future__ import annotations

from .reference import (
    feature_dim,
    feature_map,
    symmetric_feature_map,
    taylor_attention_chunked,
    taylor_attention_quadratic,
    taylor_attention_step,
)

__all__ = [
    "taylor_linear_attention",
    "taylor_linear_attention_step",
    "feature_dim",
    "feature_map",
    "symmetric_feature_map",
    "taylor_attention_chunked",
    "taylor_attention_quadratic",
    "taylor_attention_step",
]


def taylor_linear_attention(q, k, v, *, eps=1e-12, initial_state=None, output_final_state=False,
                            cu_seqlens=None):
    """Causal Taylor linear attention ``y_t = sum_{j<=t} K(q_t,k_j) v_j / (sum_{j<=t} K(q_t,k_j) + eps)``.

    Args:
        q, k: ``[B, T, H, f]``; v: ``[B, T, H, d_v]``. Any strides.
        eps: added to the denominator (which is >= (t+1)/2, so eps is inert).
        initial_state: ``(S [B, H, D, d_v], z [B, H, D])`` fp32, D = 1 + f + f^2; per document with cu_seqlens.
        output_final_state: also return the state after the last token.
        cu_seqlens: ``[N + 1]`` int document offsets (FlashAttention convention, B = 1); state resets per doc.
    Returns:
        ``(y [B, T, H, d_v] in v.dtype, final_state or None)``.
    """
    return taylor_attention_chunked(q, k, v, eps=eps, initial_state=initial_state,
                                    output_final_state=output_final_state, cu_seqlens=cu_seqlens)


def taylor_linear_attention_step(q, k, v, state, *, eps=1e-12):
    """One decode step (update before read). q, k ``[B, H, f]``, v ``[B, H, d_v]``; returns ``(y, new_state)``."""
    return taylor_attention_step(q, k, v, state, eps=eps)
