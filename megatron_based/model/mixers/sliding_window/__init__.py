"""The "S" mixer, sliding-window softmax attention: the module with its spec, FLOPs, sizes, released-checkpoint
rules and generation (``mixer.py``) and its context-parallel K/V halo (``context_parallel.py``)."""
from .mixer import SlidingWindowAttention, SlidingWindowSubmodules

__all__ = ["SlidingWindowAttention", "SlidingWindowSubmodules"]
