"""Triton backward of the short convolution (optionally fused with SiLU and gate); deterministic, no atomics.

With ``dc = dy * g * SiLU'(c)`` (or ``dc = dy`` without the gate):
``dx_t = sum_s w[:, K-1-s] * dc_{t+s}`` over rows t + s of the same sequence, ``dg = dy * SiLU(c)``,
``dw[:, i] = sum_t dc_t * x_{t-(K-1)+i}`` and the initial-state gradient is the same transposed convolution
evaluated at the K - 1 rows before each sequence start. ``c`` is recomputed from x (K shifted loads that hit
L1/L2) instead of being stored by the forward. Each program reduces its dw over CHUNK rows into one
``[K, BC]`` partial; the partials are summed in a fixed order afterwards.
"""
from __future__ import annotations

import triton
import triton.language as tl

from .._common import INTERPRET, configs
from .forward import conv_at, row_context

# rows per program in the main backward kernel: one dw partial per CHUNK rows (fewer masked sub-blocks in the
# interpreter's short test sequences)
CHUNK = 32 if INTERPRET else 128


@triton.jit
def dc_at(x, g, dy, init, w, rows, valid, n, start, o_c, m_c, s_xt, s_gt, s_dyt, s_in, s_it, s_wc, s_wk,
          K: tl.constexpr, GATE: tl.constexpr, HAS_INIT: tl.constexpr):
    """Gradient w.r.t. the conv output at ``rows`` (fp32, zero where not ``valid``); also returns c, dy."""
    r64 = rows.to(tl.int64)[:, None]
    m = valid[:, None] & m_c[None, :]
    b_dy = tl.load(dy + r64 * s_dyt + o_c[None, :], mask=m, other=0.0).to(tl.float32)
    if GATE:
        b_c = conv_at(x, init, w, rows, valid, n, start, o_c, m_c, s_xt, s_in, s_it, s_wc, s_wk, K, HAS_INIT)
        b_g = tl.load(g + r64 * s_gt + o_c[None, :], mask=m, other=0.0).to(tl.float32)
        b_sig = tl.sigmoid(b_c)
        return b_dy * b_g * b_sig * (1.0 + b_c * (1.0 - b_sig)), b_c * b_sig, b_dy
    return b_dy, b_dy, b_dy


@triton.jit
def conv_transpose_at(x, g, dy, init, w, rows, valid, n, start, end, o_c, m_c, s_xt, s_gt, s_dyt, s_in, s_it,
                      s_wc, s_wk, K: tl.constexpr, GATE: tl.constexpr, HAS_INIT: tl.constexpr, S0: tl.constexpr):
    """``sum_{s >= S0} w[:, K-1-s] * dc_{rows+s}`` over rows + s inside ``[start, end)``."""
    b_dx = tl.zeros([rows.shape[0], o_c.shape[0]], dtype=tl.float32)
    for s in tl.static_range(S0, K):
        r = rows + s
        v = valid & (r >= start) & (r < end)
        b_dc, _, _ = dc_at(x, g, dy, init, w, r, v, n, start, o_c, m_c, s_xt, s_gt, s_dyt, s_in, s_it, s_wc, s_wk,
                           K, GATE, HAS_INIT)
        b_w = tl.load(w + o_c * s_wc + (K - 1 - s) * s_wk, mask=m_c, other=0.0).to(tl.float32)
        b_dx += b_dc * b_w[None, :]
    return b_dx


@triton.autotune(
    configs=configs(
        [triton.Config({"BT": bt, "BC": bc}, num_warps=nw)
         for bt, bc, nw in [(32, 128, 4), (16, 256, 4), (32, 256, 8)]],
        triton.Config({"BT": 16, "BC": 32}),
    ),
    key=["K", "GATE"],
)
@triton.jit
def conv_bwd_kernel(
    x, g, w, init, dy, dx, dg, dwp, doc, cu,
    s_xb, s_xt, s_gb, s_gt, s_dyb, s_dyt, s_dxb, s_dxt, s_dgb, s_dgt, s_in, s_it, s_wc, s_wk,
    T, C, NT,
    K: tl.constexpr, GATE: tl.constexpr, HAS_INIT: tl.constexpr, IS_VARLEN: tl.constexpr,
    CHUNK: tl.constexpr, BT: tl.constexpr, BC: tl.constexpr,
):
    i_c, i_t, i_b = tl.program_id(0), tl.program_id(1), tl.program_id(2).to(tl.int64)
    o_c = i_c * BC + tl.arange(0, BC)
    m_c = o_c < C
    x, dy = x + i_b * s_xb, dy + i_b * s_dyb
    g = g + i_b * s_gb
    o_k = tl.arange(0, 4)  # K <= 4 taps: dw accumulates as one [4, BC] tile
    b_dw = tl.zeros([4, BC], dtype=tl.float32)
    for i_s in range(CHUNK // BT):
        rows = i_t * CHUNK + i_s * BT + tl.arange(0, BT)
        m_t = rows < T
        n, start, end = row_context(rows, i_b, T, doc, cu, IS_VARLEN)
        b_dc, b_sc, b_dy = dc_at(x, g, dy, init, w, rows, m_t, n, start, o_c, m_c, s_xt, s_gt, s_dyt, s_in, s_it,
                                 s_wc, s_wk, K, GATE, HAS_INIT)
        b_w = tl.load(w + o_c * s_wc + (K - 1) * s_wk, mask=m_c, other=0.0).to(tl.float32)
        b_dx = b_dc * b_w[None, :] + conv_transpose_at(x, g, dy, init, w, rows, m_t, n, start, end, o_c, m_c, s_xt,
                                                       s_gt, s_dyt, s_in, s_it, s_wc, s_wk, K, GATE, HAS_INIT, 1)
        r64 = rows.to(tl.int64)[:, None]
        m = m_t[:, None] & m_c[None, :]
        tl.store(dx + i_b * s_dxb + r64 * s_dxt + o_c[None, :], b_dx.to(dx.dtype.element_ty), mask=m)
        if GATE:
            tl.store(dg + i_b * s_dgb + r64 * s_dgt + o_c[None, :], (b_dy * b_sc).to(dg.dtype.element_ty), mask=m)
        for i in tl.static_range(K):
            pos = rows - (K - 1) + i
            rel = pos - start
            m_x = m_t & (rel >= 0)
            b_x = tl.load(x + pos.to(tl.int64)[:, None] * s_xt + o_c[None, :], mask=m_x[:, None] & m_c[None, :],
                          other=0.0).to(tl.float32)
            if HAS_INIT:
                m_i = m_t & (rel < 0)
                p_i = init + (n * s_in + (K - 1 + rel) * s_it).to(tl.int64)[:, None] + o_c[None, :]
                b_x += tl.load(p_i, mask=m_i[:, None] & m_c[None, :], other=0.0).to(tl.float32)
            b_dw += tl.where(o_k[:, None] == i, tl.sum(b_dc * b_x, 0)[None, :], 0.0)
    p_dw = dwp + (i_b * NT + i_t) * 4 * C + o_k[:, None] * C + o_c[None, :]
    tl.store(p_dw, b_dw, mask=(o_k[:, None] < K) & m_c[None, :])


@triton.jit
def conv_bwd_init_kernel(
    x, g, w, init, dy, dinit, cu,
    s_xb, s_xt, s_gb, s_gt, s_dyb, s_dyt, s_in, s_it, s_wc, s_wk,
    T, C,
    K: tl.constexpr, GATE: tl.constexpr, IS_VARLEN: tl.constexpr, BC: tl.constexpr,
):
    """Initial-state gradient ``[N, K-1, C]``: the transposed conv at the K - 1 rows before each start."""
    i_c, i_n = tl.program_id(0), tl.program_id(1).to(tl.int64)
    o_c = i_c * BC + tl.arange(0, BC)
    m_c = o_c < C
    if IS_VARLEN:
        i_b = 0
        start, end = tl.load(cu + i_n), tl.load(cu + i_n + 1)
    else:
        i_b = i_n
        start, end = 0, T
    o_r = tl.arange(0, 4) - 4  # row offsets -4 .. -1 before the start; only the last K - 1 are state rows
    valid = o_r >= -(K - 1)
    b_dx = conv_transpose_at(x + i_b * s_xb, g + i_b * s_gb, dy + i_b * s_dyb, init, w, start + o_r, valid, i_n,
                             start, end, o_c, m_c, s_xt, s_gt, s_dyt, s_in, s_it, s_wc, s_wk, K, GATE, True, 0)
    p = dinit + i_n * (K - 1) * C + (K - 1 + o_r)[:, None] * C + o_c[None, :]
    tl.store(p, b_dx.to(dinit.dtype.element_ty), mask=valid[:, None] & m_c[None, :])
