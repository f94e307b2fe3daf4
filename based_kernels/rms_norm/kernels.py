"""Triton kernels of RMSNorm: the forward (y and the per-row rstd) and the backward (dx and per-program partial
sums of the weight gradient).

A row is one tile of ``BLOCK_D >= D`` columns (a power of two, masked beyond D), so each row is read once per
pass and its statistics stay in registers. ``D`` is a constexpr (one compiled kernel per hidden size): the
compiler then knows its divisibility and the column mask does not stop vector loads when D is not a power of
two (e.g. 1000 = 8 x 125: 16-byte bf16 loads). Row strides of x and dy are passed in units of ``ALIGN``
elements (the largest power of two <= 16 bytes dividing them) and multiplied by that constexpr, so Triton
knows each row's alignment too. y and dx are written contiguous (row stride D). Statistics and math in fp32.

x and y may have different dtypes (fp32 residual in, bf16 out: ``fp32_residual_connection``); then dy has y's
dtype and dx x's. Every load and store converts from / to its own pointer's element type, and the strides count
elements of their own tensor (ALIGN divides both, so one constexpr serves x and dy whatever their dtypes).
"""
from __future__ import annotations

import triton
import triton.language as tl

from .._common import configs, tune_bench

MAX_D = 16384  # the row lives in registers: above this the tile would spill (use backend="torch")
# Backward: rows per program are a multiple of this (>= every BLOCK_M below), so that row blocks never straddle
# two programs' ranges except at the very end.
ROW_QUANTUM = 8


# (BLOCK_M rows per tile, warps); 32 warps only for one-row tiles (huge D). Pruned per BLOCK_D by _prune.
_CONFIGS = [triton.Config({"BLOCK_M": m}, num_warps=w) for m in (1, 2, 4, 8) for w in (4, 8, 16)] + [
    triton.Config({"BLOCK_M": 1}, num_warps=32)]


def _prune(max_tile, max_per_thread):
    """Keeps the configs whose tile (BLOCK_M rows x BLOCK_D) holds at most ``max_tile`` elements (one row at
    least) and 8 to ``max_per_thread`` per thread (fewer leave lanes idle or loads narrow; more spill); never
    none: else the one closest to that range (tiny or huge D)."""
    def prune(cfgs, named_args, **kwargs):
        bd = kwargs.get("BLOCK_D", named_args.get("BLOCK_D"))
        fits = [c for c in cfgs if c.kwargs["BLOCK_M"] * bd <= max(max_tile, bd)]
        per = {id(c): c.kwargs["BLOCK_M"] * bd / (32 * c.num_warps) for c in fits}
        kept = [c for c in fits if 8 <= per[id(c)] <= max_per_thread]
        return kept or [min(fits, key=lambda c: max(8 / per[id(c)], per[id(c)] / max_per_thread))]
    return prune


def _autotuned(max_per_thread):
    """Autotuning over ``_CONFIGS`` per (D, BLOCK_D), pruned to tiles of <= 8192 elements and 8 to
    ``max_per_thread`` elements per thread (forward 64; backward 32, as it keeps x and dy live per element)."""
    return triton.autotune(configs=configs(_CONFIGS, triton.Config({"BLOCK_M": 2}, num_warps=1)),
                           do_bench=tune_bench, key=["D", "BLOCK_D"],
                           prune_configs_by={"early_config_prune": _prune(8192, max_per_thread)})


@_autotuned(max_per_thread=64)
@triton.jit
def rms_fwd_kernel(x_ptr, w_ptr, y_ptr, rstd_ptr, stride_x, N, eps, D: tl.constexpr, BLOCK_D: tl.constexpr,
                   ALIGN: tl.constexpr, BLOCK_M: tl.constexpr):
    """Rows ``[pid * BLOCK_M, (pid + 1) * BLOCK_M)``: ``rstd = 1 / sqrt(mean(x^2) + eps)`` (fp32, stored) and
    ``y = x * rstd * w`` with w first rounded to x's dtype (``F.rms_norm(x, .., w.to(x.dtype))``), computed in
    fp32 and rounded once to y's dtype (x's, or the caller's out_dtype)."""
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.arange(0, BLOCK_D)
    rmask = rows < N
    mask = rmask[:, None] & (cols < D)[None, :]
    r64 = rows.to(tl.int64)[:, None]
    x = tl.load(x_ptr + r64 * stride_x * ALIGN + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    w = tl.load(w_ptr + cols, mask=cols < D, other=0.0).to(x_ptr.dtype.element_ty).to(tl.float32)
    rstd = tl.rsqrt(tl.sum(x * x, 1) / D + eps)
    y = x * rstd[:, None] * w[None, :]
    tl.store(y_ptr + r64 * D + cols[None, :], y.to(y_ptr.dtype.element_ty), mask=mask)
    tl.store(rstd_ptr + rows, rstd, mask=rmask)


@_autotuned(max_per_thread=64)
@triton.jit
def add_rms_fwd_kernel(x_ptr, r_ptr, b_ptr, w_ptr, h_ptr, y_ptr, stride_x, stride_r, N, eps, D: tl.constexpr,
                       BLOCK_D: tl.constexpr, ALIGN: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr):
    """The residual add before a norm, and the norm (inference; no backward): ``h = r + (x + b)`` with x and b
    first rounded to h's (= r's) dtype and each sum rounded to it (``reference.residual_add``: no-ops for an fp32
    residual), stored; then ``rms_fwd_kernel``'s math on h (statistics from h's stored values, w rounded to h's
    dtype), y rounded once to its dtype. x and r have their own row strides (in ALIGN elements), h and y are
    contiguous."""
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.arange(0, BLOCK_D)
    rmask = rows < N
    mask = rmask[:, None] & (cols < D)[None, :]
    r64 = rows.to(tl.int64)[:, None]
    h_ty = h_ptr.dtype.element_ty
    x = tl.load(x_ptr + r64 * stride_x * ALIGN + cols[None, :], mask=mask, other=0.0).to(h_ty).to(tl.float32)
    if HAS_BIAS:
        b = tl.load(b_ptr + cols, mask=cols < D, other=0.0).to(h_ty).to(tl.float32)
        x = (x + b[None, :]).to(h_ty).to(tl.float32)
    r = tl.load(r_ptr + r64 * stride_r * ALIGN + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    h = (r + x).to(h_ty)
    tl.store(h_ptr + r64 * D + cols[None, :], h, mask=mask)
    hf = h.to(tl.float32)
    w = tl.load(w_ptr + cols, mask=cols < D, other=0.0).to(h_ty).to(tl.float32)
    rstd = tl.rsqrt(tl.sum(hf * hf, 1) / D + eps)
    tl.store(y_ptr + r64 * D + cols[None, :], (hf * rstd[:, None] * w[None, :]).to(y_ptr.dtype.element_ty),
             mask=mask)


@_autotuned(max_per_thread=32)
@triton.jit
def rms_bwd_kernel(x_ptr, w_ptr, dy_ptr, rstd_ptr, dx_ptr, dwp_ptr, stride_x, stride_dy, N, rows_per_prog,
                   D: tl.constexpr, BLOCK_D: tl.constexpr, ALIGN: tl.constexpr, BLOCK_M: tl.constexpr):
    """Program p walks rows ``[p * rows_per_prog, min(N, (p + 1) * rows_per_prog))`` in blocks of BLOCK_M:
    with ``x_hat = x * rstd`` and ``g = dy * w`` (w rounded to x's dtype, as in the forward),
    ``dx = rstd * (g - x_hat * mean(g * x_hat))`` (fp32, stored in dx's dtype) and it accumulates
    ``dy * x_hat`` over its rows in fp32, stored as row p of the partial weight gradient ``dwp [programs, D]``
    (summed over programs by the caller: deterministic, no atomics)."""
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK_D)
    cmask = (cols < D)[None, :]
    w = tl.load(w_ptr + cols, mask=cols < D, other=0.0).to(x_ptr.dtype.element_ty).to(tl.float32)[None, :]
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    start = pid * rows_per_prog
    end = tl.minimum(start + rows_per_prog, N)
    for r0 in range(start, end, BLOCK_M):
        rows = r0 + tl.arange(0, BLOCK_M)
        rmask = rows < end
        mask = rmask[:, None] & cmask
        r64 = rows.to(tl.int64)[:, None]
        x = tl.load(x_ptr + r64 * stride_x * ALIGN + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        dy = tl.load(dy_ptr + r64 * stride_dy * ALIGN + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        rstd = tl.load(rstd_ptr + rows, mask=rmask, other=0.0)[:, None]
        x_hat = x * rstd
        g = dy * w
        c = tl.sum(g * x_hat, 1)[:, None] / D
        dx = (g - x_hat * c) * rstd
        tl.store(dx_ptr + r64 * D + cols[None, :], dx.to(dx_ptr.dtype.element_ty), mask=mask)
        acc += dy * x_hat
    tl.store(dwp_ptr + pid.to(tl.int64) * D + cols, tl.sum(acc, 0), mask=cols < D)
