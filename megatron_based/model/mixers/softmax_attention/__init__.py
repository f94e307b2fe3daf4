"""The "A" mixer of hybrids, Megatron's ``SelfAttention`` with our RoPE and SDPA core attention: the module with its
spec, FLOPs, sizes and generation (``mixer.py``) and its context-parallel K/V all-gather
(``context_parallel.py``)."""
from .mixer import SDPACoreAttention, SoftmaxAttention

__all__ = ["SoftmaxAttention", "SDPACoreAttention"]
