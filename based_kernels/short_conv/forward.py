"""Triton forward of the causal depthwise short convolution, optionally fused with BaseConv's SiLU and gate.

``c_t = sum_i w[:, i] * x_{t - (K-1) + i}`` (tap K-1 multiplies the current token), ``y = SiLU(c) * g`` when a gate
is given, else ``y = c``. Rows before a sequence's (or document's) start read the initial state, else zero.
With ``HAS_BIAS`` the in-projection bias ``b [2C]`` is added on load: ``x + b[:C]``, ``g + b[C:]`` (the state
rows are conv inputs already and get none).
One program per (channel block, row block, batch); the K shifted row tiles are separate loads of the same
lines, so DRAM sees each input once and the K - 1 row halo comes from L1/L2. Accumulation in fp32.
"""
from __future__ import annotations

import triton
import triton.language as tl

from .._common import configs, tune_bench
from .._jit_common import grid_program3


@triton.jit
def row_context(rows, i_b, T, doc, cu, IS_VARLEN: tl.constexpr):
    """(state index, start, end) of each row's sequence: the batch row, or its document under cu_seqlens."""
    if IS_VARLEN:
        n = tl.load(doc + rows, mask=rows < T, other=0)
        start = tl.load(cu + n)
        end = tl.load(cu + n + 1)
    else:
        n = i_b
        start = 0
        end = T
    return n, start, end


@triton.jit
def conv_at(x, bias, init, w, rows, valid, n, start, o_c, m_c, s_xt, s_in, s_it, s_wc, s_wk,
            K: tl.constexpr, HAS_INIT: tl.constexpr, HAS_BIAS: tl.constexpr):
    """fp32 ``[len(rows), BC]`` convolution at ``rows`` (absolute rows of x; ``x`` already offset to the batch)."""
    b_c = tl.zeros([rows.shape[0], o_c.shape[0]], dtype=tl.float32)
    if HAS_BIAS:
        b_b = tl.load(bias + o_c, mask=m_c, other=0.0).to(tl.float32)
    for i in tl.static_range(K):
        pos = rows - (K - 1) + i
        rel = pos - start
        m = valid & (rel >= 0)
        b_x = tl.load(x + pos.to(tl.int64)[:, None] * s_xt + o_c[None, :], mask=m[:, None] & m_c[None, :],
                      other=0.0).to(tl.float32)
        if HAS_BIAS:
            b_x += tl.where(m[:, None], b_b[None, :], 0.0)
        if HAS_INIT:
            m_i = valid & (rel < 0)
            p_i = init + (n * s_in + (K - 1 + rel) * s_it).to(tl.int64)[:, None] + o_c[None, :]
            b_x += tl.load(p_i, mask=m_i[:, None] & m_c[None, :], other=0.0).to(tl.float32)
        b_w = tl.load(w + o_c * s_wc + i * s_wk, mask=m_c, other=0.0).to(tl.float32)
        b_c += b_x * b_w[None, :]
    return b_c


@triton.autotune(
    configs=configs(
        [triton.Config({"BT": bt, "BC": bc}, num_warps=nw)
         for bt, bc, nw in [(32, 128, 4), (64, 128, 4), (16, 256, 4), (32, 256, 8)]],
        triton.Config({"BT": 16, "BC": 32}),
    ),
    do_bench=tune_bench, key=["K", "GATE"],
)
@triton.jit
def conv_fwd_kernel(
    x, g, w, bias, init, y, doc, cu,
    s_xb, s_xt, s_gb, s_gt, s_yb, s_yt, s_in, s_it, s_wc, s_wk,
    T, C,
    K: tl.constexpr, GATE: tl.constexpr, HAS_INIT: tl.constexpr, HAS_BIAS: tl.constexpr, IS_VARLEN: tl.constexpr,
    BT: tl.constexpr, BC: tl.constexpr,
):
    i_c, i_t, i_b = grid_program3(tl.cdiv(C, BC), tl.cdiv(T, BT))
    i_b = i_b.to(tl.int64)
    o_c = i_c * BC + tl.arange(0, BC)
    m_c = o_c < C
    rows = i_t * BT + tl.arange(0, BT)
    m_t = rows < T
    n, start, _ = row_context(rows, i_b, T, doc, cu, IS_VARLEN)
    b_c = conv_at(x + i_b * s_xb, bias, init, w, rows, m_t, n, start, o_c, m_c, s_xt, s_in, s_it, s_wc, s_wk,
                  K, HAS_INIT, HAS_BIAS)
    r64 = rows.to(tl.int64)[:, None]
    m = m_t[:, None] & m_c[None, :]
    if GATE:
        b_g = tl.load(g + i_b * s_gb + r64 * s_gt + o_c[None, :], mask=m, other=0.0).to(tl.float32)
        if HAS_BIAS:
            b_g += tl.load(bias + C + o_c, mask=m_c, other=0.0).to(tl.float32)[None, :]
        b_c = b_c * tl.sigmoid(b_c) * b_g
    tl.store(y + i_b * s_yb + r64 * s_yt + o_c[None, :], b_c.to(y.dtype.element_ty), mask=m)
