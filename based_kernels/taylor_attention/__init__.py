"""Taylor (2nd-order) linear attention, the BASED "L" mixer's core.

Public API: :func:`taylor_linear_attention` (parallel form) and :func:`taylor_linear_attention_step`
(one-token decode). ``backend=None`` runs the Triton kernels on CUDA tensors and the chunked PyTorch path on CPU
tensors; ``backend="triton"`` forces the kernels (CPU tests run them under ``TRITON_INTERPRET=1``);
``backend="torch"`` forces PyTorch. See ``README.md`` for the math, the kernel design and the state layout.
"""
from __future__ import annotations

from .. import _common
from .._common import check_backend, resolve_backend
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


def _use_triton(backend, x, f, step=False):
    check_backend(backend)
    if backend is None and _common._BACKEND[0] is None:
        from .ops import MAX_F, MAX_F_STEP
        return x.is_cuda and f <= (MAX_F_STEP if step else MAX_F)  # larger f: the PyTorch path
    return resolve_backend(backend, x) == "triton"


def taylor_linear_attention(q, k, v, *, eps=1e-12, initial_state=None, output_final_state=False,
                            cu_seqlens=None, backend=None, output_normalizer=False):
    """Causal Taylor linear attention ``y_t = sum_{j<=t} K(q_t,k_j) v_j / (sum_{j<=t} K(q_t,k_j) + eps)``.

    Args:
        q, k: ``[B, T, H, f]``; v: ``[B, T, H, d_v]``. Any strides (the Triton path needs the last dim
            contiguous and copies otherwise). fp16/bf16/fp32; states and accumulation in fp32.
        eps: added to the denominator (which is >= (t+1)/2, so eps is inert).
        initial_state: ``(S [N, H, D, d_v], z [N, H, D])`` fp32, D = 1 + f + f^2, N = B (or the number of
            documents with cu_seqlens); differentiable.
        output_final_state: also return the state after the last token (per document with cu_seqlens).
        cu_seqlens: ``[N + 1]`` int document offsets (FlashAttention convention, B = 1); state resets per doc.
        backend: None (Triton on CUDA, PyTorch on CPU), ``"triton"`` or ``"torch"``.
        output_normalizer: also return the denominator ``den [B, T, H]`` (fp32; fp64 for fp64 inputs on the
            PyTorch path), without eps, so ``y = num / (den + eps)``; differentiable (context parallelism uses it
            to merge the incoming state after a local, zero-state pass).
    Returns:
        ``(y [B, T, H, d_v] in v.dtype, (S, z) or None)``; with ``output_normalizer``
        ``(y, (S, z) or None, den)``.
    """
    if _use_triton(backend, q, q.shape[-1]):
        from .ops import taylor_attention_triton
        return taylor_attention_triton(q, k, v, eps=eps, initial_state=initial_state,
                                       output_final_state=output_final_state, cu_seqlens=cu_seqlens,
                                       output_normalizer=output_normalizer)
    return taylor_attention_chunked(q, k, v, eps=eps, initial_state=initial_state,
                                    output_final_state=output_final_state, cu_seqlens=cu_seqlens,
                                    output_normalizer=output_normalizer)


def taylor_linear_attention_step(q, k, v, state, *, eps=1e-12, backend=None, inplace=False):
    """One decode step (update before read). q, k ``[B, H, f]``, v ``[B, H, d_v]``, state ``(S, z)`` or None;
    returns ``(y [B, H, d_v], new_state)``. The input state is not modified unless ``inplace=True``, which
    updates ``(S, z)`` (contiguous fp32) in place and returns them (decode loops and CUDA graphs: fixed buffers,
    half the memory traffic)."""
    if inplace and state is None:
        raise ValueError("inplace=True needs a state to update; pass zeros for the first token")
    if _use_triton(backend, q, q.shape[-1], step=True):
        from .ops import taylor_attention_step_triton
        return taylor_attention_step_triton(q, k, v, state, eps=eps, inplace=inplace)
    y, new = taylor_attention_step(q, k, v, state, eps=eps)
    if inplace:
        state[0].copy_(new[0])
        state[1].copy_(new[1])
        return y, state
    return y, new
