"""Launchers, autograd and ``torch.library`` custom ops of the Triton RMSNorm.

Everything works on a 2-D view ``x [N, D]`` (rows = tokens, last dim contiguous, any row stride) and a weight
``w [D]``. The forward writes ``y [N, D]`` (contiguous, x's dtype) and ``rstd [N]`` (fp32, kept for the
backward together with x and w); the backward writes ``dx [N, D]`` (contiguous, x's dtype) and per-program
fp32 partial weight gradients ``[programs, D]`` that one ``.sum(0)`` reduces (deterministic).
"""
from __future__ import annotations

import torch

from .._common import Launcher, cdiv, next_pow2, row_align
from .kernels import ROW_QUANTUM, rms_bwd_kernel, rms_fwd_kernel

__all__ = ["RMSNormFunction", "rms_norm_fwd_op", "rms_norm_bwd_op", "fwd_triton", "bwd_triton"]

_fwd, _bwd = Launcher(rms_fwd_kernel), Launcher(rms_bwd_kernel)
_SMS = {}
PROGRAMS_PER_SM = 4  # backward programs (each a contiguous range of rows); the interpreter's "device": 4 SMs


def _sm_count(device) -> int:
    n = _SMS.get(device)
    if n is None:
        n = _SMS[device] = torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" \
            else 4
    return n


def fwd_triton(x: torch.Tensor, w: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    N, D = x.shape
    y = torch.empty((N, D), dtype=x.dtype, device=x.device)
    rstd = torch.empty(N, dtype=torch.float32, device=x.device)
    a = row_align(x)
    _fwd(lambda meta: (cdiv(N, meta["BLOCK_M"]),), (x, w, y, rstd, x.stride(0) // a, N, eps),
         D=D, BLOCK_D=next_pow2(D), ALIGN=a)
    return y, rstd


def bwd_triton(dy: torch.Tensor, x: torch.Tensor, w: torch.Tensor, rstd: torch.Tensor):
    """``(dx, dw)``: dx in x's dtype, dw in w's dtype (the fp32 sum of the programs' partials)."""
    N, D = x.shape
    if dy.stride(1) != 1:
        dy = dy.contiguous()
    # ~PROGRAMS_PER_SM programs per SM, each over a contiguous range of a multiple of ROW_QUANTUM rows
    rows_per = cdiv(cdiv(N, _sm_count(x.device) * PROGRAMS_PER_SM), ROW_QUANTUM) * ROW_QUANTUM
    progs = cdiv(N, rows_per)
    dx = torch.empty((N, D), dtype=x.dtype, device=x.device)
    dwp = torch.empty((progs, D), dtype=torch.float32, device=x.device)
    a = row_align(x, dy)
    _bwd(lambda meta: (progs,), (x, w, dy, rstd, dx, dwp, x.stride(0) // a, dy.stride(0) // a, N, rows_per),
         D=D, BLOCK_D=next_pow2(D), ALIGN=a)
    return dx, dwp.sum(0).to(w.dtype)


# -------------------------------------------------------------------------------------------------- eager autograd
class RMSNormFunction(torch.autograd.Function):
    """Eager path: ``apply(x [N, D], w [D], eps) -> y [N, D]``; saves x (the view itself), w and rstd."""

    @staticmethod
    def forward(ctx, x, w, eps):
        y, rstd = fwd_triton(x, w, eps)
        ctx.save_for_backward(x, w, rstd)
        return y

    @staticmethod
    def backward(ctx, dy):
        x, w, rstd = ctx.saved_tensors
        dx, dw = bwd_triton(dy, x, w, rstd)
        return dx, dw, None


# ------------------------------------------------------------------------- torch.compile path: opaque custom ops
@torch.library.custom_op("based_kernels::rms_norm_fwd", mutates_args=())
def rms_norm_fwd_op(x: torch.Tensor, w: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``(y [N, D], rstd [N] fp32)``."""
    return fwd_triton(x, w, eps)


@rms_norm_fwd_op.register_fake
def _(x, w, eps):
    return x.new_empty(x.shape), x.new_empty(x.shape[0], dtype=torch.float32)


@torch.library.custom_op("based_kernels::rms_norm_bwd", mutates_args=())
def rms_norm_bwd_op(dy: torch.Tensor, x: torch.Tensor, w: torch.Tensor,
                    rstd: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(dx [N, D] in x's dtype, dw [D] in w's dtype)``."""
    return bwd_triton(dy, x, w, rstd)


@rms_norm_bwd_op.register_fake
def _(dy, x, w, rstd):
    return x.new_empty(x.shape), w.new_empty(w.shape)


def _setup_context(ctx, inputs, output):
    x, w, _ = inputs
    ctx.save_for_backward(x, w, output[1])


def _backward(ctx, dy, drstd):  # rstd is an internal output: its gradient is ignored
    x, w, rstd = ctx.saved_tensors
    dx, dw = rms_norm_bwd_op(dy, x, w, rstd)
    return dx, dw, None


torch.library.register_autograd("based_kernels::rms_norm_fwd", _backward, setup_context=_setup_context)
