"""Causal depthwise short convolution and the fused BaseConv core (the BASED "C" mixer)."""
from __future__ import annotations

from .reference import base_conv_reference, short_conv_reference, short_conv_step

__all__ = ["short_conv", "short_conv_step", "base_conv", "base_conv_reference", "short_conv_reference"]


def short_conv(x, weight, *, initial_state=None, output_final_state=False, cu_seqlens=None):
    """Causal depthwise conv, x ``[B, T, C]``, weight ``[C, k]``; returns ``(y, final_state or None)``."""
    return short_conv_reference(x, weight, initial_state=initial_state, output_final_state=output_final_state,
                                cu_seqlens=cu_seqlens)


def base_conv(u1, u2, weight, *, initial_state=None, output_final_state=False, cu_seqlens=None):
    """``SiLU(short_conv(u1)) * u2``; returns ``(y, final_state or None)``."""
    return base_conv_reference(u1, u2, weight, initial_state=initial_state, output_final_state=output_final_state,
                               cu_seqlens=cu_seqlens)
