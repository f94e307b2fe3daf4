"""The "H" mixer, Zoology's BaseConv with a long implicit convolution (``mixer.py``): the BaseConv-only model of
Zoology's MQAR figure 2 uses it in its second layer. No context parallelism."""
from .mixer import LongConvBaseConv, LongConvSubmodules, causal_fft_conv, implicit_filter_positions

__all__ = ["LongConvBaseConv", "LongConvSubmodules", "causal_fft_conv", "implicit_filter_positions"]
