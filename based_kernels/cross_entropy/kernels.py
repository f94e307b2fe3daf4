"""Triton kernels of the vocab-parallel cross entropy: per-row statistics (forward) and the logits gradient.

Rows are tokens, columns this rank's vocabulary slice ``[v_start, v_start + V)``; both kernels read the logits in
their own dtype and do fp32 math. Full column blocks are loaded without a mask, and row strides are passed in
units of ``ALIGN`` elements (16 bytes where the stride allows: V = 50264 bf16 rows are) and multiplied by that
constexpr in the kernel, so Triton knows the alignment: 16-byte vector loads and stores. Only the last, partial
block is masked (a mask against an arbitrary V, or a plain row stride like 50264, makes every access 2 bytes).
"""
from __future__ import annotations

import triton
import triton.language as tl

from .._common import INTERPRET, configs, tune_bench

# Backward: a fixed config (no autotuning: the kernel may write into its own input, which reruns would corrupt).
BWD_BLOCK_V, BWD_WARPS = (64, 1) if INTERPRET else (4096, 8)


@triton.jit
def _online(m, s, x):
    """Per-lane running max m and sum exp(x - m) after one more element x per lane, one exp each:
    ``exp(-|x - m|)`` is exp(x - m) when x <= m (added) or exp(m - x) when x is the lane's new max (the sum is
    rescaled and 1 added). -inf adds nothing; a nan makes the lane (and the row) nan."""
    e = tl.exp(tl.minimum(x, m) - tl.maximum(x, m))
    grow = x > m
    s = tl.where(x != float("-inf"), tl.where(grow, s * e + 1.0, s + e), s)
    return tl.where(grow, x, m), s


@triton.autotune(
    configs=configs([triton.Config({"BLOCK_V": bv}, num_warps=w) for bv, w in
                     ((2048, 4), (4096, 4), (4096, 8), (8192, 8))],
                    triton.Config({"BLOCK_V": 64}, num_warps=1)),
    do_bench=tune_bench, key=["V"],
)
@triton.jit
def ce_fwd_kernel(x_ptr, t_ptr, stats_ptr, stride_x, stride_t, N, V, v_start, ALIGN: tl.constexpr,
                  BLOCK_V: tl.constexpr):
    """One program per row (``stride_x`` in units of ALIGN elements): ``stats[0, row]`` = local max m,
    ``stats[1, row]`` = sum exp(x - m), ``stats[2, row]`` = the target's logit if it lies in this slice, else 0.
    Online over V in blocks with per-lane (max, sum) merged once at the end."""
    row = tl.program_id(0).to(tl.int64)
    base = x_ptr + row * stride_x * ALIGN
    cols = tl.arange(0, BLOCK_V)
    m = tl.full([BLOCK_V], float("-inf"), tl.float32)
    s = tl.zeros([BLOCK_V], tl.float32)
    n_full = V // BLOCK_V
    for i in range(0, n_full):
        m, s = _online(m, s, tl.load(base + i * BLOCK_V + cols).to(tl.float32))
    if n_full * BLOCK_V < V:
        idx = n_full * BLOCK_V + cols
        m, s = _online(m, s, tl.load(base + idx, mask=idx < V, other=float("-inf")).to(tl.float32))
    m_row = tl.max(m, 0)
    s_row = tl.sum(tl.where(m > float("-inf"), s * tl.exp(m - m_row), 0.0), 0)
    t = tl.load(t_ptr + row * stride_t) - v_start
    hit = (t >= 0) & (t < V)
    x_t = tl.load(base + tl.where(hit, t, 0)).to(tl.float32)
    tl.store(stats_ptr + row, m_row)
    tl.store(stats_ptr + N + row, s_row)
    tl.store(stats_ptr + 2 * N + row, tl.where(hit, x_t, 0.0))


@triton.jit
def _grad(x, idx, m, log_s, g, t):
    d = tl.exp((x - m) - log_s) * g
    return tl.where(idx == t, d - g, d)


@triton.jit
def ce_bwd_kernel(x_ptr, t_ptr, ms_ptr, dl_ptr, out_ptr, stride_x, stride_t, stride_dl, stride_out, N, V, v_start,
                  ALIGN: tl.constexpr, BLOCK_V: tl.constexpr):
    """``out[row, v] = (exp(x[row, v] - m[row] - log_s[row]) - [v == target - v_start]) * dloss[row]`` in out's
    dtype (row strides in units of ALIGN elements), with ``ms = [m; log_s]`` (``[2, N]``: the global max and
    log sum exp(x - m), kept apart so that ``x - m`` is exact for large logits); one program per (row, column
    block). Each element is read before it is
    written by the same thread, so ``out`` may be ``x`` itself."""
    row = tl.program_id(0).to(tl.int64)
    v0 = tl.program_id(1) * BLOCK_V
    idx = v0 + tl.arange(0, BLOCK_V)
    px = x_ptr + row * stride_x * ALIGN + idx
    po = out_ptr + row * stride_out * ALIGN + idx
    m = tl.load(ms_ptr + row)
    log_s = tl.load(ms_ptr + N + row)
    g = tl.load(dl_ptr + row * stride_dl).to(tl.float32)
    t = tl.load(t_ptr + row * stride_t) - v_start
    if v0 + BLOCK_V <= V:
        d = _grad(tl.load(px).to(tl.float32), idx, m, log_s, g, t)
        tl.store(po, d.to(out_ptr.dtype.element_ty))
    else:
        ok = idx < V
        d = _grad(tl.load(px, mask=ok, other=float("-inf")).to(tl.float32), idx, m, log_s, g, t)
        tl.store(po, d.to(out_ptr.dtype.element_ty), mask=ok)
