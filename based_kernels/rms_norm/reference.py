"""Plain-PyTorch RMSNorm: the CPU path of :func:`based_kernels.rms_norm` (``torch.nn.functional.rms_norm``)."""
from __future__ import annotations

import torch

__all__ = ["rms_norm_reference"]


def rms_norm_reference(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-5,
                       out_dtype: torch.dtype | None = None) -> torch.Tensor:
    """``y = x * rsqrt(mean(x^2, -1) + eps) * weight.to(x.dtype)`` over the last dim, in ``out_dtype`` (None: x's
    dtype). With another output dtype the formula runs in the wider of the two (x and the rounded weight cast up
    exactly) and is rounded once to ``out_dtype``: an fp32 residual normed into bf16 gets fp32 statistics from the
    fp32 values, as on the Triton path."""
    w = weight.to(x.dtype)
    if out_dtype is None or out_dtype == x.dtype:
        return torch.nn.functional.rms_norm(x, (x.shape[-1],), w, eps)
    compute = torch.promote_types(x.dtype, out_dtype)
    return torch.nn.functional.rms_norm(x.to(compute), (x.shape[-1],), w.to(compute), eps).to(out_dtype)
