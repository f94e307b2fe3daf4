"""Causal depthwise short convolution and the fused BaseConv core (the BASED "C" mixer)."""
from __future__ import annotations

from .._common import resolve_backend
from .reference import (base_conv_packed_reference, base_conv_packed_step_reference, base_conv_reference,
                        base_conv_step_reference, short_conv_reference)
from .reference import short_conv_step as short_conv_step_reference

__all__ = ["short_conv", "short_conv_step", "base_conv", "base_conv_step", "base_conv_packed", "base_conv_packed_step",
           "base_conv_reference", "base_conv_step_reference", "base_conv_packed_reference",
           "base_conv_packed_step_reference", "short_conv_reference", "short_conv_step_reference"]


def _use_triton(backend, x):
    return resolve_backend(backend, x) == "triton"


def _check(x, g, weight, initial_state, cu_seqlens):
    if x.dim() != 3:
        raise ValueError(f"expected x [B, T, C]; got {tuple(x.shape)}")
    B, T, C = x.shape
    if g is not None and g.shape != x.shape:
        raise ValueError(f"the gate u2 {tuple(g.shape)} must match u1 {tuple(x.shape)}")
    if weight.dim() != 2 or weight.shape[0] != C or not 2 <= weight.shape[1] <= 4:
        raise ValueError(f"weight must be [C={C}, k] with 2 <= k <= 4 for the Triton kernel; got "
                         f"{tuple(weight.shape)} (use backend='torch' for other k)")
    N = B
    if cu_seqlens is not None:
        if B != 1:
            raise ValueError(f"cu_seqlens needs batch size 1 (documents packed along T); got B={B}")
        N = cu_seqlens.numel() - 1
    if initial_state is not None and tuple(initial_state.shape) != (N, weight.shape[1] - 1, C):
        raise ValueError(f"initial_state must be [N, k-1, C] = {(N, weight.shape[1] - 1, C)} (N = batch or "
                         f"documents); got {tuple(initial_state.shape)}")


def _conv(x, g, weight, initial_state, output_final_state, cu_seqlens):
    from .ops import conv_triton, final_state

    _check(x, g, weight, initial_state, cu_seqlens)
    y = conv_triton(x, g, weight, initial_state, cu_seqlens)
    fin = final_state(x, initial_state, weight.shape[1], cu_seqlens) if output_final_state else None
    return y, fin


def short_conv(x, weight, *, initial_state=None, output_final_state=False, cu_seqlens=None, backend=None):
    """Causal depthwise conv ``y_t = sum_i weight[:, i] x_{t-(k-1)+i}``; x ``[B, T, C]``, weight ``[C, k]``.

    initial_state ``[N, k-1, C]`` holds the inputs before each sequence (N = B, or documents with cu_seqlens).
    backend: None (Triton for CUDA tensors, PyTorch otherwise), "triton" or "torch".
    Returns ``(y [B, T, C], final_state [N, k-1, C] or None)``.
    """
    if not _use_triton(backend, x):
        return short_conv_reference(x, weight, initial_state=initial_state, output_final_state=output_final_state,
                                    cu_seqlens=cu_seqlens)
    return _conv(x, None, weight, initial_state, output_final_state, cu_seqlens)


def base_conv(u1, u2, weight, *, initial_state=None, output_final_state=False, cu_seqlens=None, backend=None):
    """BaseConv core ``SiLU(short_conv(u1)) * u2`` fused in one pass; u1, u2 ``[B, T, C]``, weight ``[C, k]``.

    Any batch/time strides with a contiguous channel dim. Gradients flow to u1, u2, weight (deterministic)
    and initial_state. Returns ``(y [B, T, C], final_state [N, k-1, C] or None)``.
    """
    if not _use_triton(backend, u1):
        return base_conv_reference(u1, u2, weight, initial_state=initial_state,
                                   output_final_state=output_final_state, cu_seqlens=cu_seqlens)
    return _conv(u1, u2, weight, initial_state, output_final_state, cu_seqlens)


def _check_packed(u, weight, bias):
    if u.dim() not in (2, 3) or u.shape[-1] % 2:
        raise ValueError(f"expected packed u [B, T, 2C] (or [B, 2C] for a step) = [u1 | u2]; got {tuple(u.shape)}")
    if bias is not None and tuple(bias.shape) != (u.shape[-1],):
        raise ValueError(f"bias must be [2C] = [{u.shape[-1]}] (the in-projection bias [b1 | b2]); got "
                         f"{tuple(bias.shape)}")
    if weight.dim() != 2 or weight.shape[0] != u.shape[-1] // 2:
        raise ValueError(f"weight must be [C={u.shape[-1] // 2}, k]; got {tuple(weight.shape)}")


def base_conv_packed(u, weight, bias=None, *, initial_state=None, output_final_state=False, cu_seqlens=None,
                     backend=None):
    """BaseConv core on the packed in-projection output: ``u1, u2 = (u + bias).chunk(2, -1)``,
    ``y = SiLU(short_conv(u1)) * u2``, in one kernel.

    u ``[B, T, 2C]`` with any batch/time strides and a contiguous last dim (Megatron's ``[s, b, 2C]`` seen as
    ``[b, s, 2C]``); bias ``[2C]`` or None (added inside the kernel; the state holds ``u1 + b1``). The backward
    writes one ``du`` laid out like u, and ``dbias`` (deterministic). Returns ``(y [B, T, C], final_state)``.
    """
    _check_packed(u, weight, bias)
    if not _use_triton(backend, u):
        return base_conv_packed_reference(u, weight, bias, initial_state=initial_state,
                                          output_final_state=output_final_state, cu_seqlens=cu_seqlens)
    from .ops import conv_packed_triton, final_state

    C = u.shape[-1] // 2
    _check(u[..., :C], None, weight, initial_state, cu_seqlens)
    y = conv_packed_triton(u, weight, bias, initial_state, cu_seqlens)
    fin = None
    if output_final_state:
        fin = final_state(u[..., :C], initial_state, weight.shape[1], cu_seqlens,
                          None if bias is None else bias[:C])
    return y, fin


def base_conv_packed_step(u, weight, state, bias=None, *, backend=None):
    """One packed decode step: u ``[B, 2C]``, bias ``[2C]`` or None, state ``[B, k-1, C]`` (None = zeros).
    Returns ``(y [B, C], new_state)``."""
    _check_packed(u, weight, bias)
    if not _use_triton(backend, u):
        return base_conv_packed_step_reference(u, weight, state, bias)
    from .ops import conv_step_triton

    C = u.shape[-1] // 2
    return conv_step_triton(u[:, :C], u[:, C:], weight, state, bias)


def short_conv_step(x, weight, state, *, backend=None):
    """One decode step: x ``[B, C]``, state ``[B, k-1, C]`` (None = zeros). Returns ``(y [B, C], new_state)``."""
    if not _use_triton(backend, x):
        return short_conv_step_reference(x, weight, state)
    from .ops import conv_step_triton

    return conv_step_triton(x, None, weight, state)


def base_conv_step(u1, u2, weight, state, *, backend=None):
    """One BaseConv decode step ``SiLU(conv_step(u1)) * u2``; returns ``(y [B, C], new_state [B, k-1, C])``."""
    if not _use_triton(backend, u1):
        return base_conv_step_reference(u1, u2, weight, state)
    from .ops import conv_step_triton

    return conv_step_triton(u1, u2, weight, state)
