"""Plain-PyTorch RMSNorm: the CPU path of :func:`based_kernels.rms_norm` (``torch.nn.functional.rms_norm``), and
of :func:`based_kernels.add_rms_norm` (the residual add, then that norm)."""
from __future__ import annotations

import torch

__all__ = ["rms_norm_reference", "residual_add", "add_rms_norm_reference"]


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


def residual_add(residual: torch.Tensor, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``residual + (x + bias)`` in the residual's dtype: x and bias are cast to it first, as Megatron's
    bias-dropout-add casts them (with an fp32 residual stream the bf16 sublayer output and bias are added in fp32).
    Without a bias the cast is left to torch's type promotion where it gives the residual's dtype: ``residual + x``
    casts x inside the one add kernel (bf16 -> fp32 is exact, so the sum is bit for bit that of casting first)."""
    if bias is None:
        if torch.promote_types(residual.dtype, x.dtype) != residual.dtype:
            x = x.to(residual.dtype)
        return residual + x
    return residual + (x.to(residual.dtype) + bias.to(residual.dtype))


def add_rms_norm_reference(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float = 1e-5,
                           bias: torch.Tensor | None = None,
                           out_dtype: torch.dtype | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(y, h)``: ``h = residual_add(residual, x, bias)`` and ``y = rms_norm_reference(h, weight, eps,
    out_dtype)``."""
    h = residual_add(residual, x, bias)
    return rms_norm_reference(h, weight, eps, out_dtype), h
