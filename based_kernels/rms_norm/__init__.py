"""RMSNorm ``y = x * rsqrt(mean(x^2) + eps) * weight`` with fp32 statistics: Triton forward and backward (the
backward reads x and dy once and writes dx once; the weight gradient from per-program partial sums), and the
residual add before a norm fused with it for inference (``add_rms_norm``).

``ops.py``: the functional API (checks, backend dispatch), launchers, autograd and custom ops; ``kernels.py``: the
Triton kernels; ``reference.py``: the PyTorch path (``torch.nn.functional.rms_norm``).
"""
from .ops import add_rms_norm, rms_norm

__all__ = ["rms_norm", "add_rms_norm"]
