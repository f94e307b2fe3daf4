"""Plain-PyTorch causal depthwise short convolution (the BaseConv conv) and the fused BaseConv core.

x ``[B, T, C]``, weight ``[C, k]``; tap ``k - 1`` multiplies the current token, zero left padding.
The state of the convolution is the last ``k - 1`` inputs ``[B, k - 1, C]``.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .._common import split_varlen

__all__ = ["short_conv_reference", "short_conv_step", "base_conv_reference", "base_conv_step_reference",
           "base_conv_packed_reference", "base_conv_packed_step_reference"]


def short_conv_reference(x, weight, *, initial_state=None, output_final_state=False, cu_seqlens=None):
    """``y_t[c] = sum_i weight[c, i] * x_{t - (k-1) + i}[c]`` with x_{<0} from ``initial_state`` (else 0).

    Args:
        x: ``[B, T, C]``; weight: ``[C, k]``; initial_state: ``[B, k - 1, C]`` (per document with cu_seqlens).
    Returns:
        ``(y [B, T, C] in x.dtype, final_state [B, k - 1, C] or None)``.
    """
    if cu_seqlens is not None:
        def one(x, initial_state=None, output_final_state=False):
            s = None if initial_state is None else initial_state[0]
            y, fin = short_conv_reference(x, weight, initial_state=s, output_final_state=output_final_state)
            return y, (fin,) if output_final_state else None

        state = None if initial_state is None else (initial_state,)
        y, fin = split_varlen(one, cu_seqlens, (x,), state, output_final_state)
        return y, (fin[0] if fin is not None else None)
    B, T, C = x.shape
    if weight.dim() != 2 or weight.shape[0] != C:
        raise ValueError(f"weight must be [C={C}, k]; got {tuple(weight.shape)}")
    km1 = weight.shape[1] - 1
    if initial_state is None:
        initial_state = x.new_zeros(B, km1, C)
    elif tuple(initial_state.shape) != (B, km1, C):
        raise ValueError(f"initial_state must be [B, k-1, C] = {(B, km1, C)}; got {tuple(initial_state.shape)}")
    xp = torch.cat([initial_state.to(x.dtype), x], dim=1)
    y = F.conv1d(xp.transpose(1, 2), weight.to(x.dtype).unsqueeze(1), groups=C).transpose(1, 2)
    return y, (xp[:, xp.shape[1] - km1 :] if output_final_state else None)


def short_conv_step(x, weight, state):
    """One decode step: x ``[B, C]``, state ``[B, k - 1, C]`` (None = zeros). Returns ``(y [B, C], new_state)``."""
    if state is None:
        state = x.new_zeros(x.shape[0], weight.shape[1] - 1, x.shape[1])
    window = torch.cat([state, x.unsqueeze(1)], dim=1)  # [B, k, C]
    y = (window * weight.t().to(window.dtype)).sum(1)
    return y.to(x.dtype), window[:, 1:]


def base_conv_reference(u1, u2, weight, *, initial_state=None, output_final_state=False, cu_seqlens=None):
    """BaseConv core ``SiLU(short_conv(u1)) * u2``; u1, u2 ``[B, T, C]``. Returns ``(y, final_state)``."""
    c, fin = short_conv_reference(u1, weight, initial_state=initial_state, output_final_state=output_final_state,
                                  cu_seqlens=cu_seqlens)
    return F.silu(c) * u2, fin


def base_conv_step_reference(u1, u2, weight, state):
    """One BaseConv decode step ``SiLU(short_conv_step(u1)) * u2``; u1, u2 ``[B, C]``. Returns ``(y, new_state)``."""
    c, new_state = short_conv_step(u1, weight, state)
    return F.silu(c) * u2, new_state


def _split(u, bias):
    u = u if bias is None else u + bias
    return u.chunk(2, dim=-1)


def base_conv_packed_reference(u, weight, bias=None, *, initial_state=None, output_final_state=False,
                               cu_seqlens=None):
    """Packed BaseConv core: ``u1, u2 = (u + bias).chunk(2, -1)``, then :func:`base_conv_reference`."""
    u1, u2 = _split(u, bias)
    return base_conv_reference(u1, u2, weight, initial_state=initial_state, output_final_state=output_final_state,
                               cu_seqlens=cu_seqlens)


def base_conv_packed_step_reference(u, weight, state, bias=None):
    """One packed decode step: u ``[B, 2C]``. Returns ``(y [B, C], new_state)``."""
    u1, u2 = _split(u, bias)
    return base_conv_step_reference(u1, u2, weight, state)
