"""Vocab-parallel cross entropy on low-precision logits: one read of the logits per pass, no fp32 copy.

``ops.py``: the functional API (checks, backend dispatch), launchers, the TP merge, autograd and custom ops;
``kernels.py``: the Triton kernels; ``reference.py``: the PyTorch passes (CPU path).
"""
from .ops import vocab_parallel_cross_entropy

__all__ = ["vocab_parallel_cross_entropy"]
