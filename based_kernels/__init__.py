"""based_kernels: BASED's sequence-mixing ops (Taylor linear attention, sliding-window attention, short
convolutions) as functional PyTorch APIs, with Triton kernels on CUDA and plain-PyTorch paths on CPU.

Every op family (a subpackage) follows one layout, described in ``README.md`` here: the functional API
(``__init__.py`` re-exports, ``ops.py`` implements), its autograd / custom-op wiring (``ops.py``), the Triton
kernels (their own modules) and the plain-PyTorch reference (``reference.py``).
"""
from ._common import use_backend
from .cross_entropy import vocab_parallel_cross_entropy
# the function rms_norm shadows the subpackage name; `from .rms_norm import ops` works
from .rms_norm import add_rms_norm, rms_norm
from .rope import rope_split_qkv
from .short_conv import base_conv, short_conv, short_conv_step
from .sliding_window import sliding_window_attention, sliding_window_step
from .taylor_attention import taylor_linear_attention, taylor_linear_attention_step

__all__ = [
    "taylor_linear_attention",
    "taylor_linear_attention_step",
    "sliding_window_attention",
    "sliding_window_step",
    "short_conv",
    "short_conv_step",
    "base_conv",
    "use_backend",
    "vocab_parallel_cross_entropy",
    "rms_norm",
    "add_rms_norm",
    "rope_split_qkv",
]
