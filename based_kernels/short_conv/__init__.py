"""Causal depthwise short convolution and the fused BaseConv core ``SiLU(short_conv(u1)) * u2`` (the BASED "C"
mixer), with one-token decode steps and the packed ``[u1 | u2]`` + bias form the mixer uses.

``ops.py``: the functional API (backend dispatch), launchers, custom ops and autograd; ``forward.py`` /
``backward.py`` / ``recurrent.py``: the Triton kernels (training passes, decode step); ``reference.py``: the
PyTorch reference (CPU path and oracle).
"""
from .ops import base_conv, base_conv_packed, base_conv_packed_step, base_conv_step, short_conv, short_conv_step
from .reference import (base_conv_packed_reference, base_conv_packed_step_reference, base_conv_reference,
                        base_conv_step_reference, short_conv_reference)
from .reference import short_conv_step as short_conv_step_reference

__all__ = ["short_conv", "short_conv_step", "base_conv", "base_conv_step", "base_conv_packed", "base_conv_packed_step",
           "base_conv_reference", "base_conv_step_reference", "base_conv_packed_reference",
           "base_conv_packed_step_reference", "short_conv_reference", "short_conv_step_reference"]
