"""Sequence mixers as Megatron-Core modules, usable as ``TransformerLayer``'s ``self_attention``: one folder per
mixer (``taylor/`` L, ``sliding_window/`` S, ``base_conv/`` C, ``softmax_attention/`` A,
``long_conv/`` H and ``zoology_short_conv/`` Z: Zoology's long- and short-convolution BaseConv), the interface they share
(``base.py``), the released-checkpoint rule helpers (``conversion.py``) and the symbol registry (``registry.py``)."""
from .base import Mixer, MixerModule
from .base_conv import BaseConv, BaseConvSubmodules
from .long_conv import LongConvBaseConv, LongConvSubmodules
from .zoology_short_conv import ZoologyShortConv
from .registry import MIXERS, get_mixer, mixer_descriptions, register_mixer, unregister_mixer
from .sliding_window import SlidingWindowAttention, SlidingWindowSubmodules
from .softmax_attention import SDPACoreAttention, SoftmaxAttention
from .taylor import TaylorLinearAttention, TaylorSubmodules

__all__ = ["Mixer", "MixerModule", "MIXERS", "get_mixer", "mixer_descriptions", "register_mixer", "unregister_mixer",
           "TaylorLinearAttention", "TaylorSubmodules", "SlidingWindowAttention", "SlidingWindowSubmodules",
           "BaseConv", "BaseConvSubmodules", "SoftmaxAttention", "SDPACoreAttention", "LongConvBaseConv",
           "LongConvSubmodules", "ZoologyShortConv"]
