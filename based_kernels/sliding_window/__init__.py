"""Causal sliding-window softmax attention (the BASED "S" mixer's core): query t attends keys t - W ... t.

``ops.py``: the functional API (backend dispatch), launchers, custom ops and autograd; ``forward.py`` /
``backward.py``: the Triton kernels; ``recurrent.py``: the one-token decode step over a ring buffer
(``sliding_window_step``); ``reference.py``: the dense PyTorch reference (CPU path and oracle) and the step's.
"""
from .ops import sliding_window_attention, sliding_window_step
from .reference import sliding_window_attention_reference, sliding_window_step_reference

__all__ = ["sliding_window_attention", "sliding_window_attention_reference", "sliding_window_step",
           "sliding_window_step_reference"]
