"""Zoology's BaseConv with a long convolution over the whole sequence (``mixer.py``): the "H" mixer, its filter
given by a small MLP of positions (implicit; the BaseConv-only model of Zoology's MQAR figure 2 uses it in its
second layer), and the "E" mixer, a free filter per channel (explicit). No context parallelism."""
from .mixer import (ExplicitLongConvBaseConv, LongConvBaseConv, LongConvSubmodules, causal_fft_conv,
                    implicit_filter_positions)

__all__ = ["ExplicitLongConvBaseConv", "LongConvBaseConv", "LongConvSubmodules", "causal_fft_conv",
           "implicit_filter_positions"]
