"""Fused RoPE + q/k/v split of a packed attention projection: one read of qkv forward, one write of dqkv backward.

``ops.py``: the functional API (checks, backend dispatch), launchers, autograd and custom ops; ``kernels.py``: the
Triton kernels; ``reference.py``: the PyTorch twin (CPU path) and the cos / sin tables.
"""
from .ops import rope_split_qkv

__all__ = ["rope_split_qkv"]
