"""``split_linear``: ``F.linear`` for products with few rows, with the reduction over K split across programs and
summed in a fixed order in the kernel (``kernels.py``). Forward only (decode steps run under inference mode).

x ``[..., K]`` (last dim contiguous, any row stride), weight ``[N, K]`` (K contiguous), bias ``[N]`` or None;
y ``[..., N]`` in x's dtype. bf16 / fp16 on the Triton path (fp32 products with fp32 accumulation); other dtypes,
CPU tensors without the interpreter and ``backend="torch"`` use ``F.linear``.

The launch: ``config = (BN, S, BK, warps, stages)``: output columns per program, programs per output tile over K,
K per loop step, and Triton's num_warps / num_stages; None picks ``default_config``. Rows per program are
min(128, next power of two >= M), at least 16 (the tensor-core tile). The S > 1 launches use an fp32 workspace of
S x M x N (allocated per call, as any output: CUDA-graph safe) and one int32 counter per output tile, kept per
device and left at zero by every launch.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .._common import cdiv, next_pow2, resolve_backend
from .kernels import split_linear_kernel

__all__ = ["split_linear", "default_config"]

_DTYPES = (torch.bfloat16, torch.float16)
_COUNTERS: dict = {}  # device -> int32 zeros, one per output tile of the largest launch so far


def _counters(device, n: int) -> torch.Tensor:
    c = _COUNTERS.get(device)
    if c is None or c.numel() < n:
        c = _COUNTERS[device] = torch.zeros(max(n, 1024), dtype=torch.int32, device=device)
    return c


def _sms(device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 132


def default_config(M: int, N: int, K: int, device) -> tuple[int, int, int, int, int]:
    """(BN, S, BK, warps, stages): 64 output columns per program and the largest S (at most 8, each K slice at
    least 4 steps of 128) that keeps the programs within one wave of the SMs."""
    BN, BK = 64, 128
    tiles = cdiv(N, BN) * cdiv(M, min(128, max(16, next_pow2(M))))
    S = 1
    while S < 8 and tiles * S * 2 <= _sms(device) and K // (S * 2) >= 4 * BK:
        S *= 2
    return BN, S, BK, 4, 4


def split_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, *, config=None,
                 backend=None) -> torch.Tensor:
    """``x @ weight^T + bias`` (see the module docstring); ``config`` = (BN, S, BK, warps, stages) or None."""
    if x.dim() < 1 or weight.dim() != 2 or x.shape[-1] != weight.shape[1]:
        raise ValueError(f"x [..., K] and weight [N, K] must share K; got {tuple(x.shape)} and {tuple(weight.shape)}")
    N, K = weight.shape
    if bias is not None and tuple(bias.shape) != (N,):
        raise ValueError(f"bias must be [N] = [{N}]; got {tuple(bias.shape)}")
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (x, weight, bias)):
        raise RuntimeError("split_linear is forward only: call it under torch.no_grad() / inference_mode()")
    if (resolve_backend(backend, x) == "torch" or x.dtype not in _DTYPES or weight.dtype != x.dtype
            or (bias is not None and bias.dtype != x.dtype) or x.numel() == 0):
        return F.linear(x, weight, bias)
    x2 = x.reshape(-1, K)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    w = weight if weight.stride(-1) == 1 else weight.contiguous()
    M = x2.shape[0]
    BN, S, BK, warps, stages = config or default_config(M, N, K, x.device)
    BM = min(128, max(16, next_pow2(M)))
    K_PER = cdiv(cdiv(K, S), BK) * BK
    S = cdiv(K, K_PER)  # no empty slices
    grid = (cdiv(N, BN), S, cdiv(M, BM))
    y = torch.empty(M, N, dtype=x.dtype, device=x.device)
    part = torch.empty(S, M, N, dtype=torch.float32, device=x.device) if S > 1 else y
    count = _counters(x.device, grid[0] * grid[2])
    split_linear_kernel[grid](x2, w, bias if bias is not None else y, y, part, count, M, N, K, K_PER,
                              x2.stride(0), w.stride(0), y.stride(0), HAS_BIAS=bias is not None, S=S, BM=BM, BN=BN,
                              BK=BK, num_warps=warps, num_stages=stages)
    return y.view(*x.shape[:-1], N)
