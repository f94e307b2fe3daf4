"""Plain-PyTorch RMSNorm: the CPU path of :func:`based_kernels.rms_norm` (``torch.nn.functional.rms_norm``)."""
from __future__ import annotations

import torch

__all__ = ["rms_norm_reference"]


def rms_norm_reference(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """``y = x * rsqrt(mean(x^2, -1) + eps) * weight.to(x.dtype)`` over the last dim, in x's dtype."""
    return torch.nn.functional.rms_norm(x, (x.shape[-1],), weight.to(x.dtype), eps)
