"""RMSNorm ``y = x * rsqrt(mean(x^2) + eps) * weight`` with fp32 statistics: Triton forward and backward (the
backward reads x and dy once and writes dx once; the weight gradient from per-program partial sums)."""
from __future__ import annotations

import torch

from .._common import resolve_backend

__all__ = ["rms_norm"]

_TRITON_DTYPES = (torch.bfloat16, torch.float16, torch.float32)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-5, backend=None) -> torch.Tensor:
    """``y = x * rsqrt(mean(x^2, -1) + eps) * weight`` over the last dim, fp32 math, y in x's dtype.

    x ``[..., D]`` (bf16 / fp16 / fp32 on the Triton path; any leading dims and row strides with a contiguous
    last dim, otherwise one copy); weight ``[D]`` in any float dtype, used as ``weight.to(x.dtype)`` like
    ``F.rms_norm(x, (D,), weight.to(x.dtype), eps)``; its gradient is the fp32 sum over rows, returned in
    weight's dtype. The Triton path takes D <= 16384 (``kernels.MAX_D``) and is deterministic.
    backend: None (Triton for CUDA tensors, PyTorch otherwise, or ``based_kernels.use_backend``), "triton",
    "torch" (``torch.nn.functional.rms_norm``).
    """
    if x.dim() < 1 or x.shape[-1] < 1:
        raise ValueError(f"x must be [..., D] with D >= 1; got {tuple(x.shape)}")
    D = x.shape[-1]
    if tuple(weight.shape) != (D,):
        raise ValueError(f"weight must be [D] = [{D}] (x's last dim); got {tuple(weight.shape)}")
    if weight.device != x.device:
        raise ValueError(f"x ({x.device}) and weight ({weight.device}) are on different devices")
    if not (x.is_floating_point() and weight.is_floating_point()):
        raise TypeError(f"x and weight must be floating point; got {x.dtype}, {weight.dtype}")
    if resolve_backend(backend, x) == "torch" or x.numel() == 0:
        return torch.nn.functional.rms_norm(x, (D,), weight.to(x.dtype), eps)
    from .kernels import MAX_D
    from .ops import RMSNormFunction, rms_norm_fwd_op

    if D > MAX_D:
        raise ValueError(f"the Triton RMSNorm keeps a row in registers: D = {D} > {MAX_D} (use backend='torch')")
    if x.dtype not in _TRITON_DTYPES:
        raise TypeError(f"the Triton RMSNorm takes {_TRITON_DTYPES} inputs; got {x.dtype} (use backend='torch')")
    x2 = x.reshape(-1, D)
    if x2.stride(1) != 1:
        x2 = x2.contiguous()
    w = weight if weight.stride(0) == 1 else weight.contiguous()
    if torch.compiler.is_compiling():
        y = rms_norm_fwd_op(x2, w, float(eps))[0]
    else:
        y = RMSNormFunction.apply(x2, w, float(eps))
    return y if x.dim() == 2 else y.view(x.shape)
