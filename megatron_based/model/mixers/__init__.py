"""BASED mixers as Megatron-Core modules, usable as ``TransformerLayer``'s ``self_attention``."""
from .base_conv import BaseConv
from .sliding_window import SlidingWindowAttention
from .softmax_attention import SDPACoreAttention, SoftmaxAttention
from .taylor import TaylorLinearAttention

__all__ = ["TaylorLinearAttention", "SlidingWindowAttention", "BaseConv", "SoftmaxAttention", "SDPACoreAttention"]
