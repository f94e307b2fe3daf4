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

from .._common import INTERPRET, configs, tune_bench
from .._jit_common import grid_program, grid_program3
from .forward import conv_at, row_context

# rows per program in the main backward kernel: one dw partial per CHUNK rows (fewer masked sub-blocks in the
# interpreter's short test sequences)
CHUNK = 32 if INTERPRET else 128


@triton.jit
def dc_at(x, g, dy, bias, init, w, rows, valid, n, start, o_c, m_c, s_xt, s_gt, s_dyt, s_in, s_it, s_wc, s_wk, C,
          K: tl.constexpr, GATE: tl.constexpr, HAS_INIT: tl.constexpr, HAS_BIAS: tl.constexpr):
    """Gradient w.r.t. the conv output at ``rows`` (fp32, zero where not ``valid``); also returns c, dy."""
    r64 = rows.to(tl.int64)[:, None]
    m = valid[:, None] & m_c[None, :]
    b_dy = tl.load(dy + r64 * s_dyt + o_c[None, :], mask=m, other=0.0).to(tl.float32)
    if GATE:
        b_c = conv_at(x, bias, init, w, rows, valid, n, start, o_c, m_c, s_xt, s_in, s_it, s_wc, s_wk, K, HAS_INIT,
                      HAS_BIAS)
        b_g = tl.load(g + r64 * s_gt + o_c[None, :], mask=m, other=0.0).to(tl.float32)
        if HAS_BIAS:
            b_g += tl.load(bias + C + o_c, mask=m_c, other=0.0).to(tl.float32)[None, :]
        b_sig = tl.sigmoid(b_c)
        return b_dy * b_g * b_sig * (1.0 + b_c * (1.0 - b_sig)), b_c * b_sig, b_dy
    return b_dy, b_dy, b_dy


@triton.jit
def conv_transpose_at(x, g, dy, bias, init, w, rows, valid, n, start, end, o_c, m_c, s_xt, s_gt, s_dyt, s_in, s_it,
                      s_wc, s_wk, C, K: tl.constexpr, GATE: tl.constexpr, HAS_INIT: tl.constexpr,
                      HAS_BIAS: tl.constexpr, S0: tl.constexpr):
    """``sum_{s >= S0} w[:, K-1-s] * dc_{rows+s}`` over rows + s inside ``[start, end)``."""
    b_dx = tl.zeros([rows.shape[0], o_c.shape[0]], dtype=tl.float32)
    for s in tl.static_range(S0, K):
        r = rows + s
        v = valid & (r >= start) & (r < end)
        b_dc, _, _ = dc_at(x, g, dy, bias, init, w, r, v, n, start, o_c, m_c, s_xt, s_gt, s_dyt, s_in, s_it, s_wc,
                           s_wk, C, K, GATE, HAS_INIT, HAS_BIAS)
        b_w = tl.load(w + o_c * s_wc + (K - 1 - s) * s_wk, mask=m_c, other=0.0).to(tl.float32)
        b_dx += b_dc * b_w[None, :]
    return b_dx


@triton.autotune(
    configs=configs(
        [triton.Config({"BT": bt, "BC": bc}, num_warps=nw)
         for bt, bc, nw in [(32, 128, 4), (16, 256, 4), (32, 256, 8)]],
        triton.Config({"BT": 16, "BC": 32}),
    ),
    do_bench=tune_bench, key=["K", "GATE"],
)
@triton.jit
def conv_bwd_kernel(
    x, g, w, bias, init, dy, dx, dg, dwp, dbp, doc, cu,
    s_xb, s_xt, s_gb, s_gt, s_dyb, s_dyt, s_dxb, s_dxt, s_dgb, s_dgt, s_in, s_it, s_wc, s_wk,
    T, C, NT,
    K: tl.constexpr, GATE: tl.constexpr, HAS_INIT: tl.constexpr, HAS_BIAS: tl.constexpr, IS_VARLEN: tl.constexpr,
    CHUNK: tl.constexpr, BT: tl.constexpr, BC: tl.constexpr,
):
    """Tile variant: each ``[BT, BC]`` tile recomputes dc at the K shifted row sets it needs."""
    i_c, i_t, i_b = grid_program3(tl.cdiv(C, BC), NT)
    i_b = i_b.to(tl.int64)
    o_c = i_c * BC + tl.arange(0, BC)
    m_c = o_c < C
    x, dy = x + i_b * s_xb, dy + i_b * s_dyb
    g = g + i_b * s_gb
    o_k = tl.arange(0, 4)  # K <= 4 taps: dw accumulates as one [4, BC] tile
    b_dw = tl.zeros([4, BC], dtype=tl.float32)
    b_db1 = tl.zeros([BC], dtype=tl.float32)
    b_db2 = tl.zeros([BC], dtype=tl.float32)
    if HAS_BIAS:
        b_b1 = tl.load(bias + o_c, mask=m_c, other=0.0).to(tl.float32)
    for i_s in range(CHUNK // BT):
        rows = i_t * CHUNK + i_s * BT + tl.arange(0, BT)
        m_t = rows < T
        n, start, end = row_context(rows, i_b, T, doc, cu, IS_VARLEN)
        b_dc, b_sc, b_dy = dc_at(x, g, dy, bias, init, w, rows, m_t, n, start, o_c, m_c, s_xt, s_gt, s_dyt, s_in,
                                 s_it, s_wc, s_wk, C, K, GATE, HAS_INIT, HAS_BIAS)
        b_w = tl.load(w + o_c * s_wc + (K - 1) * s_wk, mask=m_c, other=0.0).to(tl.float32)
        b_dx = b_dc * b_w[None, :] + conv_transpose_at(x, g, dy, bias, init, w, rows, m_t, n, start, end, o_c, m_c,
                                                       s_xt, s_gt, s_dyt, s_in, s_it, s_wc, s_wk, C, K, GATE,
                                                       HAS_INIT, HAS_BIAS, 1)
        r64 = rows.to(tl.int64)[:, None]
        m = m_t[:, None] & m_c[None, :]
        tl.store(dx + i_b * s_dxb + r64 * s_dxt + o_c[None, :], b_dx.to(dx.dtype.element_ty), mask=m)
        if GATE:
            tl.store(dg + i_b * s_dgb + r64 * s_dgt + o_c[None, :], (b_dy * b_sc).to(dg.dtype.element_ty), mask=m)
        if HAS_BIAS:  # rows past T have b_dx = b_dy = 0
            b_db1 += tl.sum(b_dx, 0)
            b_db2 += tl.sum(b_dy * b_sc, 0)
        for i in tl.static_range(K):
            pos = rows - (K - 1) + i
            rel = pos - start
            m_x = m_t & (rel >= 0)
            b_x = tl.load(x + pos.to(tl.int64)[:, None] * s_xt + o_c[None, :], mask=m_x[:, None] & m_c[None, :],
                          other=0.0).to(tl.float32)
            if HAS_BIAS:
                b_x += tl.where(m_x[:, None], b_b1[None, :], 0.0)
            if HAS_INIT:
                m_i = m_t & (rel < 0)
                p_i = init + (n * s_in + (K - 1 + rel) * s_it).to(tl.int64)[:, None] + o_c[None, :]
                b_x += tl.load(p_i, mask=m_i[:, None] & m_c[None, :], other=0.0).to(tl.float32)
            b_dw += tl.where(o_k[:, None] == i, tl.sum(b_dc * b_x, 0)[None, :], 0.0)
    p_dw = dwp + (i_b * NT + i_t) * 4 * C + o_k[:, None] * C + o_c[None, :]
    tl.store(p_dw, b_dw, mask=(o_k[:, None] < K) & m_c[None, :])
    if HAS_BIAS:
        p_db = dbp + (i_b * NT + i_t) * 2 * C + o_c
        tl.store(p_db, b_db1, mask=m_c)
        tl.store(p_db + C, b_db2, mask=m_c)


@triton.jit
def conv_bwd_init_kernel(
    x, g, w, bias, init, dy, dinit, cu,
    s_xb, s_xt, s_gb, s_gt, s_dyb, s_dyt, s_in, s_it, s_wc, s_wk,
    T, C,
    K: tl.constexpr, GATE: tl.constexpr, HAS_BIAS: tl.constexpr, IS_VARLEN: tl.constexpr, BC: tl.constexpr,
):
    """Initial-state gradient ``[N, K-1, C]``: the transposed conv at the K - 1 rows before each start."""
    i_c, i_n = grid_program(tl.cdiv(C, BC))
    i_n = i_n.to(tl.int64)
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
    b_dx = conv_transpose_at(x + i_b * s_xb, g + i_b * s_gb, dy + i_b * s_dyb, bias, init, w, start + o_r, valid,
                             i_n, start, end, o_c, m_c, s_xt, s_gt, s_dyt, s_in, s_it, s_wc, s_wk, C, K, GATE, True,
                             HAS_BIAS, 0)
    p = dinit + i_n * (K - 1) * C + (K - 1 + o_r)[:, None] * C + o_c[None, :]
    tl.store(p, b_dx.to(dinit.dtype.element_ty), mask=valid[:, None] & m_c[None, :])


# ------------------------------------------------------------------------------------------------ stream variant
@triton.jit
def _stream_load(x, g, dy, r, T, o_c, m_c, s_xt, s_gt, s_dyt, GATE: tl.constexpr):
    """Row r of x, g, dy (raw dtype; zero past T)."""
    m = m_c & (r < T)
    r64 = r.to(tl.int64)
    b_x = tl.load(x + r64 * s_xt + o_c, mask=m, other=0.0)
    b_dy = tl.load(dy + r64 * s_dyt + o_c, mask=m, other=0.0)
    b_g = tl.load(g + r64 * s_gt + o_c, mask=m, other=0.0) if GATE else b_dy
    return b_x, b_g, b_dy


@triton.jit
def _prev(v, j: tl.constexpr, rel, n, init, o_c, m_c, s_in, s_it, K: tl.constexpr, HAS_INIT: tl.constexpr):
    """Conv input j rows back: the carried row ``v`` inside the sequence, else its initial state (else zero)."""
    if HAS_INIT:
        p = init + (n * s_in + (K - 1 + rel - j) * s_it).to(tl.int64) + o_c
        return tl.where(rel >= j, v, tl.load(p, mask=m_c & (rel < j), other=0.0).to(tl.float32))
    return tl.where(rel >= j, v, 0.0)


@triton.jit
def _stream_row(row, r, t0, win, pend, acc, a, b_b1, b_b2, init, doc, cu, dx, dg, i_b, T, o_c, m_c,
                s_in, s_it, s_dxt, s_dgt, K: tl.constexpr, GATE: tl.constexpr, HAS_INIT: tl.constexpr,
                HAS_BIAS: tl.constexpr, IS_VARLEN: tl.constexpr, MAIN: tl.constexpr):
    """One row r of the stream: dc_r from the carried window; dg_r (MAIN rows); push w * dc_r into the pending
    dx rows r .. r-K+1 of the same sequence and emit row r-K+1, now complete. ``win`` = conv inputs of rows
    r-1, r-2, r-3; ``pend`` = pending dx of rows r-1, r-2, r-3; ``acc`` = (dw by lag 0..3, db1, db2);
    ``a`` = weight taps by lag (a[j] = w[:, K-1-j])."""
    b_x = row[0].to(tl.float32)
    if HAS_BIAS:
        b_x += b_b1  # also on rows past T: harmless, their dc is 0
    if IS_VARLEN:
        n = tl.load(doc + r, mask=r < T, other=0)
        rel = r - tl.load(cu + n)
    else:
        n = i_b
        rel = r
    x1, x2, x3 = win
    if IS_VARLEN or HAS_INIT:  # otherwise rows before 0 were loaded as zeros and there is no reset
        x1 = _prev(x1, 1, rel, n, init, o_c, m_c, s_in, s_it, K, HAS_INIT)
        if K > 2:
            x2 = _prev(x2, 2, rel, n, init, o_c, m_c, s_in, s_it, K, HAS_INIT)
        if K > 3:
            x3 = _prev(x3, 3, rel, n, init, o_c, m_c, s_in, s_it, K, HAS_INIT)
    b_c = a[0] * b_x + a[1] * x1
    if K > 2:
        b_c += a[2] * x2
    if K > 3:
        b_c += a[3] * x3
    b_dy = row[2].to(tl.float32)
    dw0, dw1, dw2, dw3, db1, db2 = acc
    if GATE:
        b_g = row[1].to(tl.float32)
        if HAS_BIAS:
            b_g += b_b2
        b_sig = tl.sigmoid(b_c)
        b_dc = b_dy * b_g * b_sig * (1.0 + b_c * (1.0 - b_sig))
        if MAIN:
            b_dg = b_dy * b_c * b_sig
            tl.store(dg + r.to(tl.int64) * s_dgt + o_c, b_dg.to(dg.dtype.element_ty), mask=m_c & (r < T))
            db2 += b_dg
    else:
        b_dc = b_dy
    if MAIN:
        dw0 += b_dc * b_x
        dw1 += b_dc * x1
        if K > 2:
            dw2 += b_dc * x2
        if K > 3:
            dw3 += b_dc * x3
    p1, p2, p3 = pend
    if IS_VARLEN:  # row r - s gets w * dc_r only inside r's document
        p1 += tl.where(rel >= 1, a[1] * b_dc, 0.0)
        if K > 2:
            p2 += tl.where(rel >= 2, a[2] * b_dc, 0.0)
        if K > 3:
            p3 += tl.where(rel >= 3, a[3] * b_dc, 0.0)
    else:
        p1 += a[1] * b_dc
        if K > 2:
            p2 += a[2] * b_dc
        if K > 3:
            p3 += a[3] * b_dc
    if K == 2:
        out = p1
    elif K == 3:
        out = p2
    else:
        out = p3
    e = r - (K - 1)
    emit = (e >= t0) & (e < T)
    tl.store(dx + e.to(tl.int64) * s_dxt + o_c, out.to(dx.dtype.element_ty), mask=m_c & emit)
    if HAS_BIAS:
        db1 += tl.where(emit, out, 0.0)
    if K == 4:
        p3 = p2
    if K >= 3:
        p2 = p1
    p1 = a[0] * b_dc
    return (b_x, win[0], win[1]), (p1, p2, p3), (dw0, dw1, dw2, dw3, db1, db2)


@triton.autotune(
    configs=configs(
        [triton.Config({"BC": bc}, num_warps=nw) for bc, nw in [(256, 2), (512, 4), (128, 1), (256, 4), (128, 2)]],
        triton.Config({"BC": 32}, num_warps=1),
    ),
    do_bench=tune_bench, key=["K", "GATE"],
)
@triton.jit
def conv_bwd_stream_kernel(
    x, g, w, bias, init, dy, dx, dg, dwp, dbp, doc, cu,
    s_xb, s_xt, s_gb, s_gt, s_dyb, s_dyt, s_dxb, s_dxt, s_dgb, s_dgt, s_in, s_it, s_wc, s_wk,
    T, C, NT,
    K: tl.constexpr, GATE: tl.constexpr, HAS_INIT: tl.constexpr, HAS_BIAS: tl.constexpr, IS_VARLEN: tl.constexpr,
    CHUNK: tl.constexpr, BC: tl.constexpr,
):
    """Stream variant: one program per (channel block, CHUNK rows, batch) walks its rows one at a time with the
    K - 1 previous conv inputs and the K - 1 pending dx rows in registers, so x, g, dy are each read once (plus
    a K - 1 row halo) and dc is computed once per row. Loads run one 4-row block ahead of the arithmetic."""
    i_c, i_t, i_b = grid_program3(tl.cdiv(C, BC), NT)
    i_b = i_b.to(tl.int64)
    o_c = i_c * BC + tl.arange(0, BC)
    m_c = o_c < C
    x, g, dy = x + i_b * s_xb, g + i_b * s_gb, dy + i_b * s_dyb
    dx, dg = dx + i_b * s_dxb, dg + i_b * s_dgb
    zero = tl.zeros([BC], dtype=tl.float32)
    a0 = tl.load(w + o_c * s_wc + (K - 1) * s_wk, mask=m_c, other=0.0).to(tl.float32)
    a1 = tl.load(w + o_c * s_wc + (K - 2) * s_wk, mask=m_c, other=0.0).to(tl.float32)
    a2, a3 = zero, zero
    if K > 2:
        a2 = tl.load(w + o_c * s_wc + (K - 3) * s_wk, mask=m_c, other=0.0).to(tl.float32)
    if K > 3:
        a3 = tl.load(w + o_c * s_wc + (K - 4) * s_wk, mask=m_c, other=0.0).to(tl.float32)
    a = (a0, a1, a2, a3)
    b_b1, b_b2 = zero, zero
    if HAS_BIAS:
        b_b1 = tl.load(bias + o_c, mask=m_c, other=0.0).to(tl.float32)
        b_b2 = tl.load(bias + C + o_c, mask=m_c, other=0.0).to(tl.float32)
    t0 = i_t * CHUNK
    # conv inputs of rows t0-1, t0-2, t0-3 (zero before row 0; resets are applied per row)
    win = (zero, zero, zero)
    for j in tl.static_range(1, K):
        v = tl.load(x + (t0 - j).to(tl.int64) * s_xt + o_c, mask=m_c & (t0 - j >= 0), other=0.0).to(tl.float32)
        if HAS_BIAS:
            v += tl.where(t0 - j >= 0, b_b1, 0.0)
        if j == 1:
            win = (v, win[1], win[2])
        elif j == 2:
            win = (win[0], v, win[2])
        else:
            win = (win[0], win[1], v)
    pend = (zero, zero, zero)
    acc = (zero, zero, zero, zero, zero, zero)
    nxt = (_stream_load(x, g, dy, t0, T, o_c, m_c, s_xt, s_gt, s_dyt, GATE),
           _stream_load(x, g, dy, t0 + 1, T, o_c, m_c, s_xt, s_gt, s_dyt, GATE),
           _stream_load(x, g, dy, t0 + 2, T, o_c, m_c, s_xt, s_gt, s_dyt, GATE),
           _stream_load(x, g, dy, t0 + 3, T, o_c, m_c, s_xt, s_gt, s_dyt, GATE))
    for i in range(CHUNK // 4):
        r = t0 + i * 4
        cur = nxt
        nxt = (_stream_load(x, g, dy, r + 4, T, o_c, m_c, s_xt, s_gt, s_dyt, GATE),
               _stream_load(x, g, dy, r + 5, T, o_c, m_c, s_xt, s_gt, s_dyt, GATE),
               _stream_load(x, g, dy, r + 6, T, o_c, m_c, s_xt, s_gt, s_dyt, GATE),
               _stream_load(x, g, dy, r + 7, T, o_c, m_c, s_xt, s_gt, s_dyt, GATE))
        for j in tl.static_range(4):
            win, pend, acc = _stream_row(cur[j], r + j, t0, win, pend, acc, a, b_b1, b_b2, init, doc, cu, dx, dg,
                                         i_b, T, o_c, m_c, s_in, s_it, s_dxt, s_dgt, K, GATE, HAS_INIT, HAS_BIAS,
                                         IS_VARLEN, True)
    # the next chunk's first K - 1 rows (already loaded) complete this chunk's last dx rows
    for j in tl.static_range(K - 1):
        win, pend, acc = _stream_row(nxt[j], t0 + CHUNK + j, t0, win, pend, acc, a, b_b1, b_b2, init, doc, cu, dx,
                                     dg, i_b, T, o_c, m_c, s_in, s_it, s_dxt, s_dgt, K, GATE, HAS_INIT, HAS_BIAS,
                                     IS_VARLEN, False)
    p_dw = dwp + (i_b * NT + i_t) * 4 * C + o_c
    for j in tl.static_range(K):  # lag j multiplies tap K - 1 - j
        tl.store(p_dw + (K - 1 - j) * C, acc[j], mask=m_c)
    if HAS_BIAS:
        p_db = dbp + (i_b * NT + i_t) * 2 * C + o_c
        tl.store(p_db, acc[4], mask=m_c)
        tl.store(p_db + C, acc[5], mask=m_c)
