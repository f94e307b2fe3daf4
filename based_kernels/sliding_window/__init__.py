"""Causal sliding-window softmax attention (the BASED "S" mixer's core): query t attends keys t - W ... t.

``ops.py``: the functional API (backend dispatch), launchers, custom ops and autograd; ``forward.py`` /
``backward.py``: the Triton kernels; ``reference.py``: the dense PyTorch reference (CPU path and oracle).
"""
from .ops import sliding_window_attention
from .reference import sliding_window_attention_reference

__all__ = ["sliding_window_attention", "sliding_window_attention_reference"]
