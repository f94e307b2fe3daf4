"""Taylor (2nd-order) linear attention, the BASED "L" mixer's core.

Public API: :func:`taylor_linear_attention` (parallel form) and :func:`taylor_linear_attention_step`
(one-token decode). ``backend=None`` runs the Triton kernels on CUDA tensors and the chunked PyTorch path on CPU
tensors; ``backend="triton"`` forces the kernels (CPU tests run them under ``TRITON_INTERPRET=1``);
``backend="torch"`` forces PyTorch. See ``README.md`` for the math, the kernel design and the state layout.

``ops.py``: the functional API (backend dispatch), launchers, custom ops and autograd; ``chunk.py`` /
``recurrent.py``: the Triton kernels (chunk-parallel training passes, decode step); ``reference.py``: the PyTorch
oracles and CPU path (and the feature maps).
"""
from .ops import taylor_linear_attention, taylor_linear_attention_step
from .reference import (
    feature_dim,
    feature_map,
    symmetric_feature_map,
    taylor_attention_chunked,
    taylor_attention_quadratic,
    taylor_attention_step,
    taylor_attention_step_buffered,
    taylor_state_with_buffer,
)

__all__ = [
    "taylor_linear_attention",
    "taylor_linear_attention_step",
    "feature_dim",
    "feature_map",
    "symmetric_feature_map",
    "taylor_attention_chunked",
    "taylor_attention_quadratic",
    "taylor_attention_step",
    "taylor_attention_step_buffered",
    "taylor_state_with_buffer",
]
