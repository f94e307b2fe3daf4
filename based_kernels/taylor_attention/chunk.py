"""Triton kernels of Taylor linear attention, chunk-parallel form.

Notation (README.md): the symmetric Taylor map ``phi(x) = [1, x', x'_a^2 / sqrt(2) (a < f), x'_a x'_b (a < b)]``
with ``x' = x f^(-1/4)``, D = 1 + f + f(f+1)/2 features (153 for f = 16; the full outer product's 1 + f + f^2 = 273
counts every off-diagonal product twice); ``K(q, k) = phi(q) . phi(k) = 1 + s + s^2/2``, ``s = q'.k'``. Feature
row ``r`` of the state is the product ``c_r x_a x_b`` of two input columns (``a`` or ``b`` = -1 stands for the
constant 1): ``r = 0`` is ``(−1, −1)``, ``r = 1 + a`` is ``(a, −1)`` with ``c = f^(-1/4)``, ``r = 1 + f + a`` is
``(a, a)`` with ``c = f^(-1/2) / sqrt(2)``, and the rows after are the pairs ``a < b`` in row-major order
(``torch.triu_indices(f, f, 1)``, reference.symmetric_feature_map) with ``c = f^(-1/2)``. A block of BF features
is formed from a ``[BT, BK]`` tile of inputs by two exact tensor-core products with 0/1 expansion matrices
(``x_a = x E_a``, ``x_b = x E_b``) and one multiply, so no gather and no 3-D tile is needed, and the result is
already in the layout of the next product.

Forward (T tokens in chunks of BT):
  1. ``taylor_chunk_state_kernel``, programs (feature block, value block, sequence x head): walks the chunks
     in order, stores the state *before* each chunk (``hc [chunks, H, D, d_v]`` in the input dtype, ``zc`` in
     fp32), then adds ``phi(K_c)^T V_c``. Only a ``[BF, BV]`` fp32 state lives on chip, so there are
     ``ceil(D/BF) * ceil(d_v/BV) * B * H`` independent programs, each a chain of one product per chunk (at few
     sequences x heads, G times as many chains G times shorter: the kernel's two-level walk).
  2. ``taylor_chunk_output_kernel``, programs (value block, chunk, head), all independent (with
     ops.OUTPUT_QUERY_ROWS one per block of a chunk's query rows): the intra-chunk ``(1 + s + s^2/2)``-masked
     product plus ``phi(Q_c) hc_c`` feature block by feature block, normalised.
  Or, with ops.FUSED_FORWARD, ``taylor_fused_forward_kernel``: both in one walk per sequence x head and value
     block, the state on chip (stored per chunk only for the backward).
Backward (``do = dy / den``, ``dd = -(dy . y) / den``; an unnormalised attention with values ``[v | 1]``):
  3. the state pass 1 again (recomputing ``hc`` costs less than keeping it between forward and backward);
  4. ``taylor_chunk_dstate_kernel``: the same walk in reverse with ``phi(Q_c)^T do_c`` (and ``dd``), storing
     the gradient of the state *after* each chunk (``dhc``, ``dzc``) and, at the end, d initial state;
  5. ``taylor_chunk_grad_kernel``, programs (value block, chunk, head): dq, dk, dv of one chunk from the
     intra-chunk terms, ``hc`` (for dq) and ``dhc`` (for dk, dv); the Jacobian of ``c x_a x_b`` is two
     products with the transposed expansion matrices.
Precision: every ``tl.dot`` with fp32 operands takes the constexpr ``PREC`` (``input_precision``), which the
launcher picks from the input dtype and ``torch.get_float32_matmul_precision()`` (_common.dot_precision): IEEE fp32
products for fp32 inputs at "highest"/"high", tf32 otherwise; the 0/1 expansion products are exact in every case.
Deterministic: no atomics; with several value blocks dq and dk are fp32 partials summed afterwards.
Varlen (``cu_seqlens``): every document starts its own chunks; ``chunk_offsets`` (first chunk of each
document) and ``chunk_meta`` (document and first token of each chunk) are computed on the host.
"""
from __future__ import annotations

import triton
import triton.language as tl

from .._jit_common import finite_rows, flag_non_finite

RSQRT2 = tl.constexpr(0.7071067811865476)


@triton.jit
def _mm(b_a, b_b, b_like, HI: tl.constexpr, PREC: tl.constexpr):
    """Product with fp32 accumulation: fp32 operands (``PREC``: tf32 on tensor cores for bf16/fp16 inputs) when
    HI, else both operands in the dtype of ``b_like`` (bf16/fp16 inputs: full-rate tensor cores; fp32: ``PREC``)."""
    if HI:
        return tl.dot(b_a.to(tl.float32), b_b.to(tl.float32), input_precision=PREC)
    else:
        return tl.dot(b_a.to(b_like.dtype), b_b.to(b_like.dtype), input_precision=PREC)


@triton.jit
def _exact(b_x, b_e):
    """``b_x @ b_e`` for a 0/1 matrix ``b_e``: exact (a selection) in every input dtype."""
    if b_x.dtype == tl.float32:
        return tl.dot(b_x, b_e.to(tl.float32), input_precision="ieee")
    else:
        return tl.dot(b_x, b_e.to(b_x.dtype))


@triton.jit
def _pairs(m, F: tl.constexpr):
    """Columns ``(i, j)``, ``i < j``, of off-diagonal pair ``m`` in row-major order (``torch.triu_indices(F, F, 1)``):
    row ``i`` starts at ``i (2F - i - 1) / 2``; ``i`` counts the row starts at or before ``m`` (exact integers)."""
    i = m * 0
    for r in tl.static_range(1, F):
        i += (m >= r * (2 * F - r - 1) // 2).to(m.dtype)
    return i, m - i * (2 * F - i - 1) // 2 + i + 1


@triton.jit
def _features(i_f, scale, F: tl.constexpr, BF: tl.constexpr):
    """Rows ``r`` of feature block ``i_f``, their mask, factor columns ``a``, ``b`` (-1 = constant) and
    coefficients ``c`` (0 on padding rows), computed: the decode kernels' source (once per program); the chunk
    kernels read the same rows from a table (``_feature_rows``)."""
    D: tl.constexpr = 1 + F + F * (F + 1) // 2
    o_r = i_f * BF + tl.arange(0, BF)
    m_r = o_r < D
    diag = (o_r > F) & (o_r <= 2 * F)
    off = o_r > 2 * F
    p_i, p_j = _pairs(tl.maximum(o_r - 1 - 2 * F, 0), F)
    a = tl.where(o_r == 0, -1, tl.where(off, p_i, tl.where(diag, o_r - 1 - F, o_r - 1)))
    b = tl.where(off, p_j, tl.where(diag, o_r - 1 - F, -1))
    c = tl.where(o_r == 0, 1.0, tl.where(off, scale * scale, tl.where(diag, scale * scale * RSQRT2, scale)))
    return o_r, m_r, a, b, tl.where(m_r, c, 0.)


@triton.jit
def _feature_rows(feat, i_f, F: tl.constexpr, BF: tl.constexpr):
    """``_features`` of block ``i_f`` read from ``feat`` (int32 ``[3, D]``: the factor columns a, b and the fp32 bits
    of the coefficient c per row; ``ops.feature_table``), the chunk kernels' source: in a ``[BF]`` slice of a tile's
    layout every thread holds many rows, and ``_pairs``' arithmetic on them was ~30% of the output pass's and 20% of
    the gradient pass's executed instructions; the table costs three cached loads per row (README, "Feature rows
    from a table": the gradient pass got faster, the output pass about the same)."""
    return _feature_rows_from(feat, i_f * BF, F, BF)


@triton.jit
def _feature_rows_from(feat, r0, F: tl.constexpr, BF: tl.constexpr):
    """``_feature_rows`` of the BF rows from row ``r0``."""
    D: tl.constexpr = 1 + F + F * (F + 1) // 2
    o_r = r0 + tl.arange(0, BF)
    m_r = o_r < D
    a = tl.load(feat + o_r, mask=m_r, other=-1)
    b = tl.load(feat + D + o_r, mask=m_r, other=-1)
    c = tl.load(feat + 2 * D + o_r, mask=m_r, other=0).to(tl.float32, bitcast=True)
    return o_r, m_r, a, b, c


@triton.jit
def _expand(b_x, a, b, BK: tl.constexpr):
    """Factors ``(x_a, x_b)`` ``[BT, BF]`` (fp32; 1 for the constant) of token rows ``b_x [BT, BK]``."""
    o_k = tl.arange(0, BK)
    b_xa = _exact(b_x, o_k[:, None] == a[None, :]) + (a < 0).to(tl.float32)[None, :]
    b_xb = _exact(b_x, o_k[:, None] == b[None, :]) + (b < 0).to(tl.float32)[None, :]
    return b_xa, b_xb


@triton.jit
def _phi(b_x, a, b, c, BK: tl.constexpr):
    """Features ``[BT, BF]`` (fp32) of token rows ``b_x [BT, BK]``."""
    b_xa, b_xb = _expand(b_x, a, b, BK)
    return b_xa * b_xb * c[None, :]


@triton.jit
def _phi_t(b_xt, a, b, c, BK: tl.constexpr):
    """Features ``[BF, BT]`` (fp32) of token columns ``b_xt [BK, BT]`` (the transposed orientation)."""
    o_k = tl.arange(0, BK)
    b_xa = _exact_t(a[:, None] == o_k[None, :], b_xt) + (a < 0).to(tl.float32)[:, None]
    b_xb = _exact_t(b[:, None] == o_k[None, :], b_xt) + (b < 0).to(tl.float32)[:, None]
    return b_xa * b_xb * c[:, None]


@triton.jit
def _exact_t(b_e, b_x):
    """``b_e @ b_x`` for a 0/1 matrix ``b_e``, exact."""
    if b_x.dtype == tl.float32:
        return tl.dot(b_e.to(tl.float32), b_x, input_precision="ieee")
    else:
        return tl.dot(b_e.to(b_x.dtype), b_x)


@triton.jit
def _phi_vjp(b_w, b_xa, b_xb, a, b, c, BK: tl.constexpr, PREC: tl.constexpr):
    """``d/dx [w . phi(x)]`` per token from feature gradients ``b_w [BT, BF]`` and the factors of ``x``
    (``_expand``) -> ``[BT, BK]`` fp32. ``d(c x_a x_b)/dx_j = c (x_b [a = j] + x_a [b = j])``."""
    o_k = tl.arange(0, BK)
    b_g = b_w * c[None, :]
    return (tl.dot(b_g * b_xb, (a[:, None] == o_k[None, :]).to(tl.float32), input_precision=PREC)
            + tl.dot(b_g * b_xa, (b[:, None] == o_k[None, :]).to(tl.float32), input_precision=PREC))


@triton.jit
def _sequence(i_n, cu_seqlens, chunk_offsets, T, NC, IS_VARLEN: tl.constexpr):
    """Batch row, token range [bos, eos) and first chunk index of sequence (or document) i_n."""
    if IS_VARLEN:
        i_b = i_n.to(tl.int64) * 0
        bos = tl.load(cu_seqlens + i_n).to(tl.int64)
        eos = tl.load(cu_seqlens + i_n + 1).to(tl.int64)
        c0 = tl.load(chunk_offsets + i_n).to(tl.int64)
    else:
        i_b = i_n.to(tl.int64)
        bos = i_b * 0
        eos = bos + T
        c0 = i_b * NC
    return i_b, bos, eos, c0


@triton.jit
def _chunk(i_c, cu_seqlens, chunk_meta, T, NC, BT: tl.constexpr, IS_VARLEN: tl.constexpr):
    """Batch row, first token and end of the sequence of chunk i_c."""
    if IS_VARLEN:
        i_n = tl.load(chunk_meta + 2 * i_c)
        t0 = tl.load(chunk_meta + 2 * i_c + 1).to(tl.int64)
        eos = tl.load(cu_seqlens + i_n + 1).to(tl.int64)
        return i_c.to(tl.int64) * 0, t0, eos
    else:
        i_b = i_c.to(tl.int64) // NC
        return i_b, (i_c.to(tl.int64) % NC) * BT, i_b * 0 + T


@triton.jit
def _load_chunk(q, k, v, i_v, i_c, cu_seqlens, chunk_meta, s_qb, s_qt, s_qh, s_kb, s_kt, s_kh, s_vb, s_vt, s_vh,
                T, H, NC, F: tl.constexpr, DV: tl.constexpr, BK: tl.constexpr, BT: tl.constexpr,
                BV: tl.constexpr, IS_VARLEN: tl.constexpr, i_q=0, BQ: tl.constexpr = 0):
    """Indices, masks and the q, k (raw) and v tiles of chunk i_c, value block i_v (output and gradient passes).
    k and v: the chunk's BT token rows (``o_t``, ``o_tt``, ``m_t``); q: the BQ rows from ``i_q * BQ`` (``o_q``,
    ``o_tq``, ``m_q``; BQ 0: the whole chunk)."""
    i_b, t0, eos = _chunk(i_c, cu_seqlens, chunk_meta, T, NC, BT, IS_VARLEN)
    i_h = tl.program_id(2)
    o_t = tl.arange(0, BT)
    o_tt = t0 + o_t
    m_t = o_tt < eos
    o_k = tl.arange(0, BK)
    o_v = i_v * BV + tl.arange(0, BV)
    m_v = o_v < DV
    m_tk = m_t[:, None] & (o_k < F)[None, :]
    if BQ == 0 or BQ == BT:
        o_q, o_tq, m_q = o_t, o_tt, m_t
    else:
        o_q = i_q * BQ + tl.arange(0, BQ)
        o_tq = t0 + o_q
        m_q = o_tq < eos
    b_q = tl.load(q + i_b * s_qb + i_h * s_qh + o_tq[:, None] * s_qt + o_k[None, :],
                  mask=m_q[:, None] & (o_k < F)[None, :], other=0.)
    b_k = tl.load(k + i_b * s_kb + i_h * s_kh + o_tt[:, None] * s_kt + o_k[None, :], mask=m_tk, other=0.)
    b_v = tl.load(v + i_b * s_vb + i_h * s_vh + o_tt[:, None] * s_vt + o_v[None, :],
                  mask=m_t[:, None] & m_v[None, :], other=0.)
    return i_b, o_t, o_tt, m_t, o_k, m_tk, o_v, m_v, b_q, b_k, b_v, o_q, o_tq, m_q


@triton.jit
def taylor_chunk_state_kernel(
    x, w, den, col, h0s, h0z, hc, hl, zc, hts, htz, tot, totz, cu_seqlens, chunk_offsets, feat,
    s_xb, s_xt, s_xh, s_wb, s_wt, s_wh,
    T, H, NC, scale,
    F: tl.constexpr, DV: tl.constexpr, BK: tl.constexpr, BT: tl.constexpr, BF: tl.constexpr,
    BV: tl.constexpr, REVERSE: tl.constexpr, USE_H0: tl.constexpr, STORE_HT: tl.constexpr,
    IS_VARLEN: tl.constexpr, STORE_LOW: tl.constexpr, PREC: tl.constexpr, GROUPS: tl.constexpr,
    TOTALS: tl.constexpr,
):
    """Per-chunk states of one feature block.

    Forward (REVERSE=False; x, w = k, v): ``hc[c]`` = state before chunk c, from ``h0`` plus
    ``sum phi(k) v^T`` (``z``: ``sum phi(k)``); ``ht`` = the state after the last chunk.
    Backward (REVERSE=True; x, w = q, dy, with ``den`` and ``col`` = dd): walks the chunks from the last,
    ``hc[c]`` = gradient of the state after chunk c, from ``h0`` (= d final state) plus
    ``sum phi(q) (dy / den)^T`` (``z``: ``sum phi(q) dd``); ``ht`` = d initial state.

    Two-level walk (GROUPS > 1; programs (feature block, value block, sequence x head x group)): each sequence's
    walk is cut into GROUPS runs of ``ceil(chunks / GROUPS)`` chunks (the last ones may be short or empty). With
    TOTALS, a program only sums its run's products from zero and stores the sum (fp32) in ``tot``/``totz`` at
    ``[sequence x head, group]``; nothing else is stored. Without, ``tot``/``totz`` hold those sums and a program
    starts from ``h0`` plus the sums of the runs before its own (in walk order, fp32), then walks its run as above;
    the last group's program stores ``ht``. The same states as one walk, but chains GROUPS times
    shorter: for few sequences x heads (a long sequence at batch 1), where one walk per program leaves SMs idle."""
    D: tl.constexpr = 1 + F + F * (F + 1) // 2
    i_f, i_v, i_nhg = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    i_nh, i_g = i_nhg // GROUPS, i_nhg % GROUPS
    i_n, i_h = i_nh // H, i_nh % H
    i_b, bos, eos, c0 = _sequence(i_n, cu_seqlens, chunk_offsets, T, NC, IS_VARLEN)
    i_st = i_n.to(tl.int64) * H + i_h

    o_r, m_r, a, b, c = _feature_rows(feat, i_f, F, BF)
    o_k = tl.arange(0, BK)
    m_k = o_k < F
    o_t = tl.arange(0, BT)
    o_v = i_v * BV + tl.arange(0, BV)
    m_v = o_v < DV
    m_rv = m_r[:, None] & m_v[None, :]
    m_z = m_r & (i_v == 0)

    if USE_H0 and not TOTALS:
        b_h = tl.load(h0s + (i_st * D + o_r[:, None]) * DV + o_v[None, :], mask=m_rv, other=0.)
        b_z = tl.load(h0z + i_st * D + o_r, mask=m_r, other=0.)
    else:
        b_h = tl.zeros([BF, BV], dtype=tl.float32)
        b_z = tl.zeros([BF], dtype=tl.float32)
    p_x0 = x + i_b * s_xb + i_h * s_xh
    p_w0 = w + i_b * s_wb + i_h * s_wh
    n_chunks = tl.cdiv(eos - bos, BT)
    i_lo = 0
    i_hi = n_chunks
    if GROUPS > 1:
        per = tl.cdiv(n_chunks, GROUPS)
        i_lo = tl.minimum(i_g * per, n_chunks)
        i_hi = tl.minimum(i_lo + per, n_chunks)
        if not TOTALS:  # the carry: the sums of the runs before this one
            for g in range(0, i_g):
                p_g = i_st * GROUPS + g
                b_h += tl.load(tot + (p_g * D + o_r[:, None]) * DV + o_v[None, :], mask=m_rv, other=0.)
                b_z += tl.load(totz + p_g * D + o_r, mask=m_r, other=0.)
    for i in range(i_lo, i_hi):
        if REVERSE:
            i_c = n_chunks - 1 - i
        else:
            i_c = i
        p_st = (c0 + i_c) * H + i_h
        if not TOTALS:
            tl.store(hc + (p_st * D + o_r[:, None]) * DV + o_v[None, :], b_h.to(hc.dtype.element_ty), mask=m_rv)
            if STORE_LOW:  # rows 0..F (constant, linear) also in fp32: the output pass reads them at full precision
                tl.store(hl + (p_st * (F + 1) + o_r[:, None]) * DV + o_v[None, :], b_h,
                         mask=m_rv & (o_r <= F)[:, None])
            tl.store(zc + p_st * D + o_r, b_z, mask=m_z)
        o_tt = bos + i_c * BT + o_t
        m_t = o_tt < eos
        b_xt = tl.load(p_x0 + o_tt[None, :] * s_xt + o_k[:, None], mask=m_k[:, None] & m_t[None, :], other=0.)
        b_w = tl.load(p_w0 + o_tt[:, None] * s_wt + o_v[None, :], mask=m_t[:, None] & m_v[None, :], other=0.)
        b_p = _phi_t(b_xt, a, b, c, BK)
        if REVERSE:
            p_d = (i_b * T + o_tt) * H + i_h
            b_den = tl.load(den + p_d, mask=m_t, other=1.)
            b_dd = tl.load(col + p_d, mask=m_t, other=0.)
            b_w = (b_w.to(tl.float32) / b_den[:, None]).to(b_w.dtype)
            b_z += tl.sum(b_p * b_dd[None, :], 1)
        else:
            b_z += tl.sum(tl.where(m_t[None, :], b_p, 0.), 1)
        b_h += tl.dot(b_p.to(hc.dtype.element_ty), b_w.to(hc.dtype.element_ty), input_precision=PREC)
    if TOTALS:
        p_g = i_st * GROUPS + i_g
        tl.store(tot + (p_g * D + o_r[:, None]) * DV + o_v[None, :], b_h, mask=m_rv)
        tl.store(totz + p_g * D + o_r, b_z, mask=m_z)
    elif STORE_HT:
        if i_g == GROUPS - 1:
            tl.store(hts + (i_st * D + o_r[:, None]) * DV + o_v[None, :], b_h, mask=m_rv)
            tl.store(htz + i_st * D + o_r, b_z, mask=m_z)


@triton.jit
def taylor_chunk_output_kernel(
    q, k, v, o, den, hc, hl, zc, cu_seqlens, chunk_meta, bad, feat,
    s_qb, s_qt, s_qh, s_kb, s_kt, s_kh, s_vb, s_vt, s_vh, s_ob, s_ot, s_oh,
    T, H, NC, scale, eps,
    F: tl.constexpr, DV: tl.constexpr, BK: tl.constexpr, BT: tl.constexpr, BF: tl.constexpr,
    BV: tl.constexpr, NF: tl.constexpr, IS_VARLEN: tl.constexpr, HI_INTRA: tl.constexpr,
    BL: tl.constexpr, PREC: tl.constexpr, LOW_PREC: tl.constexpr, CONFINE: tl.constexpr, BQ: tl.constexpr = 0,
):
    """Output of BQ query rows of one chunk (BQ 0: the whole chunk; programs (value block, chunk x query block,
    head), the query blocks of a chunk adjacent): intra-chunk ``(1 + s + s^2/2)`` part over the chunk's keys plus
    ``phi(Q) . (hc_c, zc_c)``. The constant and linear rows (the largest terms: the constant row is the running sum
    of v) come from their fp32 copy ``hl`` in a 3-pass tf32 product (~fp32; ``LOW_PREC``, IEEE when PREC is); the
    quadratic rows from the bf16 ``hc`` on bf16 tensor cores. ``PREC``: the input_precision of the other products
    with fp32 operands (_common.dot_precision: IEEE for fp32 inputs at torch's default float32 matmul precision, else
    tf32). Query blocks (BQ < BT) keep [BQ, BT] scores and [BQ, BF] features live instead of [BT, BT] and [BT, BF]:
    fewer registers per program, for k, v and the chunk's state read once per block (from L2). Launched plain, then
    with ``CONFINE`` (``_common.launch_confined``)."""
    if CONFINE:  # the confining re-launch: only after a plain program flagged a non-finite result
        if tl.load(bad) == 0:
            return
    D: tl.constexpr = 1 + F + F * (F + 1) // 2
    NQ: tl.constexpr = 1 if BQ == 0 else BT // BQ
    i_v, i_cq, i_h = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    i_c, i_q = i_cq // NQ, i_cq % NQ
    p_st = i_c.to(tl.int64) * H + i_h
    i_b, o_t, o_tt, m_t, o_k, m_tk, o_v, m_v, b_q, b_k, b_v, o_q, o_tq, m_q = _load_chunk(
        q, k, v, i_v, i_c, cu_seqlens, chunk_meta, s_qb, s_qt, s_qh, s_kb, s_kt, s_kh, s_vb, s_vt, s_vh,
        T, H, NC, F, DV, BK, BT, BV, IS_VARLEN, i_q, BQ)

    b_s = tl.dot(b_q, tl.trans(b_k), input_precision=PREC) * (scale * scale)
    m_c = (o_q[:, None] >= o_t[None, :]) & m_t[None, :]
    b_A = tl.where(m_c, 1. + b_s + 0.5 * b_s * b_s, 0.)
    b_w = b_A
    if CONFINE:  # a non-finite v row reaches only the queries that see it, through A (not 0 * NaN: _jit_common)
        b_v, b_vnan = finite_rows(b_v)
        b_w = tl.where(m_c, b_A + b_vnan[None, :], 0.)
    b_num = _mm(b_w, b_v, b_v, HI_INTRA, PREC)
    b_den = tl.sum(b_A, 1)
    o_l, m_l, a_l, b_l, c_l = _feature_rows(feat, 0, F, BL)
    m_l = m_l & (o_l <= F)
    b_hl = tl.load(hl + (p_st * (F + 1) + o_l[:, None]) * DV + o_v[None, :], mask=m_l[:, None] & m_v[None, :],
                   other=0.)
    b_num += tl.dot(_phi(b_q, a_l, b_l, tl.where(m_l, c_l, 0.), BK), b_hl, input_precision=LOW_PREC)
    for i_f in range(0, NF):
        o_r, m_r, a, b, c = _feature_rows(feat, i_f, F, BF)
        b_h = tl.load(hc + (p_st * D + o_r[:, None]) * DV + o_v[None, :],
                      mask=(m_r & (o_r > F))[:, None] & m_v[None, :], other=0.)
        b_z = tl.load(zc + p_st * D + o_r, mask=m_r, other=0.)
        b_p = _phi(b_q, a, b, c, BK)
        b_num += tl.dot(b_p.to(b_h.dtype), b_h, input_precision=PREC)
        b_den += tl.sum(b_p * b_z[None, :], 1)
    b_o = b_num / (b_den + eps)[:, None]
    tl.store(o + i_b * s_ob + i_h * s_oh + o_tq[:, None] * s_ot + o_v[None, :], b_o.to(o.dtype.element_ty),
             mask=m_q[:, None] & m_v[None, :])
    tl.store(den + (i_b * T + o_tq) * H + i_h, b_den, mask=m_q & (i_v == 0))
    if not CONFINE:
        flag_non_finite(bad, b_o, b_den, m_q)


@triton.jit
def _tiles_of_state(s, z, i_st, o_v, m_v, D: tl.constexpr, DV: tl.constexpr, BL: tl.constexpr,
                    BR: tl.constexpr, BV: tl.constexpr, LOAD: tl.constexpr):
    """The fused kernels' state on chip: rows 0..BL-1 and BL..BL+BR-1 of a state ``s [.., D, DV]`` / ``z [.., D]``
    at ``i_st`` (value columns ``o_v``) as two fp32 tiles ``([BL, BV], [BR, BV], [BL], [BR])``: loaded (LOAD), else
    zeros."""
    o_l = tl.arange(0, BL)
    o_r = BL + tl.arange(0, BR)
    if LOAD:
        b_sl = tl.load(s + (i_st * D + o_l[:, None]) * DV + o_v[None, :], mask=(o_l < D)[:, None] & m_v[None, :],
                       other=0.)
        b_sr = tl.load(s + (i_st * D + o_r[:, None]) * DV + o_v[None, :], mask=(o_r < D)[:, None] & m_v[None, :],
                       other=0.)
        b_zl = tl.load(z + i_st * D + o_l, mask=o_l < D, other=0.)
        b_zr = tl.load(z + i_st * D + o_r, mask=o_r < D, other=0.)
    else:
        b_sl = tl.zeros([BL, BV], dtype=tl.float32)
        b_sr = tl.zeros([BR, BV], dtype=tl.float32)
        b_zl = tl.zeros([BL], dtype=tl.float32)
        b_zr = tl.zeros([BR], dtype=tl.float32)
    return b_sl, b_sr, b_zl, b_zr


@triton.jit
def _store_state(s, z, i_st, b_sl, b_sr, b_zl, b_zr, o_v, m_v, i_v, D: tl.constexpr, DV: tl.constexpr,
                 BL: tl.constexpr, BR: tl.constexpr):
    """``_tiles_of_state``'s tiles into ``s`` (in its dtype) and ``z`` (value block 0) at ``i_st``."""
    o_l = tl.arange(0, BL)
    o_r = BL + tl.arange(0, BR)
    tl.store(s + (i_st * D + o_l[:, None]) * DV + o_v[None, :], b_sl.to(s.dtype.element_ty),
             mask=(o_l < D)[:, None] & m_v[None, :])
    tl.store(s + (i_st * D + o_r[:, None]) * DV + o_v[None, :], b_sr.to(s.dtype.element_ty),
             mask=(o_r < D)[:, None] & m_v[None, :])
    tl.store(z + i_st * D + o_l, b_zl, mask=(o_l < D) & (i_v == 0))
    tl.store(z + i_st * D + o_r, b_zr, mask=(o_r < D) & (i_v == 0))


@triton.jit
def _walk(b_xt, b_w, b_wz, b_sl, b_sr, b_zl, b_zr, feat, F: tl.constexpr, BK: tl.constexpr, BL: tl.constexpr,
          BR: tl.constexpr, SDT: tl.constexpr, PREC: tl.constexpr):
    """One step of the fused kernels' walk: ``S += phi(X)^T W`` and ``z += phi(X)^T wz`` over the step's tokens
    (columns of ``b_xt [BK, BC]``, rows of ``b_w [BC, BV]``, ``b_wz [BC]``), on both tiles; the products on SDT
    operands as the two-pass state walk's. The feature rows are read here, where they are used (from the table in
    L1): fewer values live across the walk's loop."""
    _, _, a, b, c = _feature_rows_from(feat, 0, F, BL)
    b_p = _phi_t(b_xt, a, b, c, BK)
    b_zl += tl.sum(b_p * b_wz[None, :], 1)
    b_sl += tl.dot(b_p.to(SDT), b_w.to(SDT), input_precision=PREC)
    _, _, a, b, c = _feature_rows_from(feat, BL, F, BR)
    b_p = _phi_t(b_xt, a, b, c, BK)
    b_zr += tl.sum(b_p * b_wz[None, :], 1)
    b_sr += tl.dot(b_p.to(SDT), b_w.to(SDT), input_precision=PREC)
    return b_sl, b_sr, b_zl, b_zr


@triton.jit
def _step_tokens(x, i_b, i_h, s_xb, s_xt, s_xh, o_tt, m_t, o_c, m_c, TRANS: tl.constexpr = False):
    """Rows ``o_tt`` (masked ``m_t``) and columns ``o_c`` (``m_c``) of ``x [B, T, H, *]`` at (batch row, head): a
    ``[BC, columns]`` tile, or its transpose (TRANS)."""
    p = x + i_b * s_xb + i_h * s_xh
    if TRANS:
        return tl.load(p + o_tt[None, :] * s_xt + o_c[:, None], mask=m_c[:, None] & m_t[None, :], other=0.)
    else:
        return tl.load(p + o_tt[:, None] * s_xt + o_c[None, :], mask=m_t[:, None] & m_c[None, :], other=0.)


@triton.jit
def _program(cu_seqlens, chunk_offsets, T, H, NC, F: tl.constexpr, DV: tl.constexpr, BK: tl.constexpr,
             BC: tl.constexpr, BV: tl.constexpr, IS_VARLEN: tl.constexpr):
    """A fused kernel's program (sequence x head, value block): value block, head, batch row, token range [bos,
    eos), first chunk, state index, and the step's feature-column, token and value-column indices with masks."""
    i_nh, i_v = tl.program_id(0), tl.program_id(1)
    i_n, i_h = i_nh // H, i_nh % H
    i_b, bos, eos, c0 = _sequence(i_n, cu_seqlens, chunk_offsets, T, NC, IS_VARLEN)
    o_k = tl.arange(0, BK)
    o_v = i_v * BV + tl.arange(0, BV)
    return i_v, i_h, i_b, bos, eos, c0, i_n.to(tl.int64) * H + i_h, o_k, o_k < F, tl.arange(0, BC), o_v, o_v < DV


@triton.jit
def _o_from_state(b_q, b_s, b_z, feat, r0, F: tl.constexpr, BK: tl.constexpr, BF: tl.constexpr, DT: tl.constexpr,
                  PREC: tl.constexpr):
    """The output's numerator and normaliser terms from one tile of the state before the step (rows r0..r0+BF-1):
    ``phi(q) S`` on ``DT`` operands in ``PREC``, and ``phi(q) . z`` (fp32)."""
    _, _, a, b, c = _feature_rows_from(feat, r0, F, BF)
    b_p = _phi(b_q, a, b, c, BK)
    return tl.dot(b_p.to(DT), b_s.to(DT), input_precision=PREC), tl.sum(b_p * b_z[None, :], 1)


@triton.jit
def _dq_from_state(b_q, b_do, b_dd, b_s, b_z, feat, r0, F: tl.constexpr, BK: tl.constexpr, BF: tl.constexpr,
                   SDT: tl.constexpr, PREC: tl.constexpr):
    """dq's term from one tile of the state before the step (rows r0..r0+BF-1): the Jacobian of
    ``phi(q) . (S dO + z dd)``, as the gradient pass's."""
    _, _, a, b, c = _feature_rows_from(feat, r0, F, BF)
    b_w = tl.dot(b_do.to(SDT), tl.trans(b_s.to(SDT)), input_precision=PREC) + b_dd[:, None] * b_z[None, :]
    b_xa, b_xb = _expand(b_q, a, b, BK)
    return _phi_vjp(b_w, b_xa, b_xb, a, b, c, BK, PREC)


@triton.jit
def _dkdv_from_state(b_k, b_v, w0, b_s, b_z, feat, r0, F: tl.constexpr, BK: tl.constexpr, BF: tl.constexpr,
                     SDT: tl.constexpr, PREC: tl.constexpr):
    """dk's and dv's terms from one tile of the gradient of the state after the step (rows r0..r0+BF-1), as the
    gradient pass's: ``phi(k) dS`` for dv, the Jacobian of ``phi(k) . (dS v + dz w0)`` for dk."""
    _, _, a, b, c = _feature_rows_from(feat, r0, F, BF)
    b_xa, b_xb = _expand(b_k, a, b, BK)
    b_dv = tl.dot((b_xa * b_xb * c[None, :]).to(SDT), b_s.to(SDT), input_precision=PREC)
    b_w = tl.dot(b_v.to(SDT), tl.trans(b_s.to(SDT)), input_precision=PREC) + w0 * b_z[None, :]
    return _phi_vjp(b_w, b_xa, b_xb, a, b, c, BK, PREC), b_dv


@triton.jit
def taylor_fused_forward_kernel(
    q, k, v, o, den, h0s, h0z, hts, htz, hc, zc, cu_seqlens, chunk_offsets, bad, feat,
    s_qb, s_qt, s_qh, s_kb, s_kt, s_kh, s_vb, s_vt, s_vh, s_ob, s_ot, s_oh,
    T, H, NC, scale, eps,
    F: tl.constexpr, DV: tl.constexpr, BK: tl.constexpr, BT: tl.constexpr, BC: tl.constexpr,
    BL: tl.constexpr, BR: tl.constexpr, BV: tl.constexpr, IS_VARLEN: tl.constexpr, USE_H0: tl.constexpr,
    STORE_HT: tl.constexpr, KEEP: tl.constexpr, HI_INTRA: tl.constexpr, PREC: tl.constexpr,
    LOW_PREC: tl.constexpr, CONFINE: tl.constexpr,
):
    """The whole forward of one sequence (or document) x head and value block, one program walking its tokens in
    steps of BC: per step the output of the step's queries (the intra-step ``(1 + s + s^2/2)``-masked product plus
    ``phi(Q)`` times the state before the step), then the state update ``+= phi(K)^T V``. The state never leaves the
    chip: two fp32 tiles of feature rows, ``[BL, BV]`` (rows 0..BL-1: the constant, the linear and the first
    quadratic rows, whose products with ``phi(Q)`` run in ``LOW_PREC``, ~fp32) and ``[BR, BV]`` (rows
    BL..BL+BR-1, on the state dtype's operands, as the two-pass forward's). ``KEEP``: also stores the state (``hc``
    in the state dtype, ``zc`` fp32) before every chunk of BT tokens (a multiple of BC), the per-chunk states the
    backward reads. ``STORE_HT``: the state after the last token (fp32). Programs (sequence x head, value block):
    for many sequences x heads, where the two passes' per-chunk states cost a round trip through memory. Launched
    plain, then with ``CONFINE`` (``_common.launch_confined``)."""
    if CONFINE:  # the confining re-launch: only after a plain program flagged a non-finite result
        if tl.load(bad) == 0:
            return
    D: tl.constexpr = 1 + F + F * (F + 1) // 2
    SDT: tl.constexpr = tl.bfloat16 if q.dtype.element_ty == tl.bfloat16 else tl.float32  # ops._state_dtype
    i_v, i_h, i_b, bos, eos, c0, i_st, o_k, m_k, o_t, o_v, m_v = _program(cu_seqlens, chunk_offsets, T, H, NC, F, DV,
                                                                          BK, BC, BV, IS_VARLEN)
    b_sl, b_sr, b_zl, b_zr = _tiles_of_state(h0s, h0z, i_st, o_v, m_v, D, DV, BL, BR, BV, USE_H0)
    m_c0 = o_t[:, None] >= o_t[None, :]
    for i in range(0, tl.cdiv(eos - bos, BC)):
        t0 = i * BC  # from the sequence's first token
        if KEEP:
            if t0 % BT == 0:  # the state before chunk t0 / BT
                _store_state(hc, zc, (c0 + t0 // BT) * H + i_h, b_sl, b_sr, b_zl, b_zr, o_v, m_v, i_v, D, DV, BL,
                             BR)
        o_tt = bos + t0 + o_t
        m_t = o_tt < eos
        m_tv = m_t[:, None] & m_v[None, :]
        b_q = _step_tokens(q, i_b, i_h, s_qb, s_qt, s_qh, o_tt, m_t, o_k, m_k)
        b_k = _step_tokens(k, i_b, i_h, s_kb, s_kt, s_kh, o_tt, m_t, o_k, m_k)
        b_v = _step_tokens(v, i_b, i_h, s_vb, s_vt, s_vh, o_tt, m_t, o_v, m_v)

        # output: the step's own keys, then the state before the step
        b_s = tl.dot(b_q, tl.trans(b_k), input_precision=PREC) * (scale * scale)
        m_c = m_c0 & m_t[None, :]
        b_A = tl.where(m_c, 1. + b_s + 0.5 * b_s * b_s, 0.)
        if CONFINE:  # a non-finite v row reaches only the queries that see it, through A (not 0 * NaN: _jit_common)
            b_vi, b_vnan = finite_rows(b_v)
            b_num = _mm(tl.where(m_c, b_A + b_vnan[None, :], 0.), b_vi, b_v, HI_INTRA, PREC)
        else:
            b_num = _mm(b_A, b_v, b_v, HI_INTRA, PREC)
        b_den = tl.sum(b_A, 1)
        b_on, b_od = _o_from_state(b_q, b_sl, b_zl, feat, 0, F, BK, BL, tl.float32, LOW_PREC)
        b_num += b_on
        b_den += b_od
        b_on, b_od = _o_from_state(b_q, b_sr, b_zr, feat, BL, F, BK, BR, SDT, PREC)
        b_num += b_on
        b_den += b_od
        b_o = b_num / (b_den + eps)[:, None]
        tl.store(o + i_b * s_ob + i_h * s_oh + o_tt[:, None] * s_ot + o_v[None, :], b_o.to(o.dtype.element_ty),
                 mask=m_tv)
        tl.store(den + (i_b * T + o_tt) * H + i_h, b_den, mask=m_t & (i_v == 0))
        if not CONFINE:
            flag_non_finite(bad, b_o, b_den, m_t)

        b_kt = _step_tokens(k, i_b, i_h, s_kb, s_kt, s_kh, o_tt, m_t, o_k, m_k, TRANS=True)
        b_sl, b_sr, b_zl, b_zr = _walk(b_kt, b_v, m_t.to(tl.float32), b_sl, b_sr, b_zl, b_zr, feat, F, BK, BL, BR,
                                       SDT, PREC)
    if STORE_HT:
        _store_state(hts, htz, i_st, b_sl, b_sr, b_zl, b_zr, o_v, m_v, i_v, D, DV, BL, BR)


@triton.jit
def _do_dd(dy, den, dd, i_b, i_h, s_yb, s_yt, s_yh, o_tt, m_t, o_v, m_v, T, H, v_dtype: tl.constexpr):
    """``dO = dy / den`` (in v's dtype) and ``dd`` of the step's tokens (``taylor_prep_kernel``)."""
    b_dy = _step_tokens(dy, i_b, i_h, s_yb, s_yt, s_yh, o_tt, m_t, o_v, m_v)
    p_d = (i_b * T + o_tt) * H + i_h
    b_den = tl.load(den + p_d, mask=m_t, other=1.)
    return (b_dy.to(tl.float32) / b_den[:, None]).to(v_dtype), tl.load(dd + p_d, mask=m_t, other=0.)


@triton.jit
def taylor_fused_dq_kernel(
    q, k, v, dy, den, dd, h0s, h0z, dq, cu_seqlens, chunk_offsets, feat,
    s_qb, s_qt, s_qh, s_kb, s_kt, s_kh, s_vb, s_vt, s_vh, s_yb, s_yt, s_yh, s_gn, s_gb, s_gt, s_gh,
    T, H, NC, scale,
    F: tl.constexpr, DV: tl.constexpr, BK: tl.constexpr, BC: tl.constexpr, BL: tl.constexpr, BR: tl.constexpr,
    BV: tl.constexpr, IS_VARLEN: tl.constexpr, USE_H0: tl.constexpr, HI: tl.constexpr, PREC: tl.constexpr,
):
    """dq (partial of value block i_v) of one sequence x head, walking its tokens forward in steps of BC with the
    state before each step on chip (``taylor_fused_forward_kernel``'s walk): the intra-step ``dS K`` plus the
    Jacobian of ``phi(q) . (S dO + z dd)``, as the gradient pass's dq. The first of the fused backward's two walks."""
    D: tl.constexpr = 1 + F + F * (F + 1) // 2
    SDT: tl.constexpr = tl.bfloat16 if q.dtype.element_ty == tl.bfloat16 else tl.float32
    i_v, i_h, i_b, bos, eos, c0, i_st, o_k, m_k, o_t, o_v, m_v = _program(cu_seqlens, chunk_offsets, T, H, NC, F, DV,
                                                                          BK, BC, BV, IS_VARLEN)
    w0 = (i_v == 0).to(tl.float32)  # the normaliser column [v | 1] belongs to value block 0
    b_sl, b_sr, b_zl, b_zr = _tiles_of_state(h0s, h0z, i_st, o_v, m_v, D, DV, BL, BR, BV, USE_H0)
    m_c0 = o_t[:, None] >= o_t[None, :]
    for i in range(0, tl.cdiv(eos - bos, BC)):
        o_tt = bos + i * BC + o_t
        m_t = o_tt < eos
        b_q = _step_tokens(q, i_b, i_h, s_qb, s_qt, s_qh, o_tt, m_t, o_k, m_k)
        b_k = _step_tokens(k, i_b, i_h, s_kb, s_kt, s_kh, o_tt, m_t, o_k, m_k)
        b_v = _step_tokens(v, i_b, i_h, s_vb, s_vt, s_vh, o_tt, m_t, o_v, m_v)
        b_do, b_dd = _do_dd(dy, den, dd, i_b, i_h, s_yb, s_yt, s_yh, o_tt, m_t, o_v, m_v, T, H, b_v.dtype)
        b_dd = b_dd * w0
        # intra-step (as the gradient pass: dS masked as a whole, k's non-finite values zeroed in dS K)
        m_c = m_c0 & m_t[None, :] & m_t[:, None]
        b_s = tl.dot(b_q, tl.trans(b_k), input_precision=PREC) * (scale * scale)
        b_dp = tl.dot(b_do, tl.trans(b_v), input_precision=PREC)
        b_dS = tl.where(m_c, (b_dp + b_dd[:, None]) * (1. + b_s), 0.) * (scale * scale)
        b_dq = _mm(b_dS, finite_rows(b_k)[0], b_v, HI, PREC)
        # the state before the step
        b_dq += _dq_from_state(b_q, b_do, b_dd, b_sl, b_zl, feat, 0, F, BK, BL, SDT, PREC)
        b_dq += _dq_from_state(b_q, b_do, b_dd, b_sr, b_zr, feat, BL, F, BK, BR, SDT, PREC)
        tl.store(dq + i_v.to(tl.int64) * s_gn + i_b * s_gb + i_h * s_gh + o_tt[:, None] * s_gt + o_k[None, :],
                 b_dq.to(dq.dtype.element_ty), mask=m_t[:, None] & m_k[None, :])
        b_kt = _step_tokens(k, i_b, i_h, s_kb, s_kt, s_kh, o_tt, m_t, o_k, m_k, TRANS=True)
        b_sl, b_sr, b_zl, b_zr = _walk(b_kt, b_v, m_t.to(tl.float32), b_sl, b_sr, b_zl, b_zr, feat, F, BK, BL, BR,
                                       SDT, PREC)


@triton.jit
def taylor_fused_dkdv_kernel(
    q, k, v, dy, den, dd, dhts, dhtz, dh0s, dh0z, dk, dv, cu_seqlens, chunk_offsets, feat,
    s_qb, s_qt, s_qh, s_kb, s_kt, s_kh, s_vb, s_vt, s_vh, s_yb, s_yt, s_yh, s_gn, s_gb, s_gt, s_gh,
    s_db, s_dt, s_dh,
    T, H, NC, scale,
    F: tl.constexpr, DV: tl.constexpr, BK: tl.constexpr, BC: tl.constexpr, BL: tl.constexpr, BR: tl.constexpr,
    BV: tl.constexpr, IS_VARLEN: tl.constexpr, USE_HT: tl.constexpr, STORE_H0: tl.constexpr, HI: tl.constexpr,
    PREC: tl.constexpr,
):
    """dk (partial of value block i_v) and dv of one sequence x head, walking its tokens backward in steps of BC
    with the gradient of the state after each step on chip (from ``dhts`` / ``dhtz``, the final state's gradient,
    with USE_HT; then ``+= phi(Q)^T dO``, ``z += phi(Q)^T dd`` per step, the d-state pass's walk): the intra-step
    ``A^T dO`` and ``dS^T Q`` plus the state terms, as the gradient pass's dk and dv. STORE_H0: the gradient of the
    initial state (fp32) after the walk. The second of the fused backward's two walks."""
    D: tl.constexpr = 1 + F + F * (F + 1) // 2
    SDT: tl.constexpr = tl.bfloat16 if q.dtype.element_ty == tl.bfloat16 else tl.float32
    i_v, i_h, i_b, bos, eos, c0, i_st, o_k, m_k, o_t, o_v, m_v = _program(cu_seqlens, chunk_offsets, T, H, NC, F, DV,
                                                                          BK, BC, BV, IS_VARLEN)
    w0 = (i_v == 0).to(tl.float32)
    b_sl, b_sr, b_zl, b_zr = _tiles_of_state(dhts, dhtz, i_st, o_v, m_v, D, DV, BL, BR, BV, USE_HT)
    m_c0 = o_t[:, None] >= o_t[None, :]
    n = tl.cdiv(eos - bos, BC)
    for j in range(0, n):
        o_tt = bos + (n - 1 - j) * BC + o_t
        m_t = o_tt < eos
        m_tv = m_t[:, None] & m_v[None, :]
        b_q = _step_tokens(q, i_b, i_h, s_qb, s_qt, s_qh, o_tt, m_t, o_k, m_k)
        b_k = _step_tokens(k, i_b, i_h, s_kb, s_kt, s_kh, o_tt, m_t, o_k, m_k)
        b_v = _step_tokens(v, i_b, i_h, s_vb, s_vt, s_vh, o_tt, m_t, o_v, m_v)
        b_do, b_dd = _do_dd(dy, den, dd, i_b, i_h, s_yb, s_yt, s_yh, o_tt, m_t, o_v, m_v, T, H, b_v.dtype)
        # intra-step (as the gradient pass; k's non-finite values zeroed for the state terms below)
        m_c = m_c0 & m_t[None, :] & m_t[:, None]
        b_s = tl.dot(b_q, tl.trans(b_k), input_precision=PREC) * (scale * scale)
        b_k = finite_rows(b_k)[0]
        b_dp = tl.dot(b_do, tl.trans(b_v), input_precision=PREC)
        b_dS = tl.where(m_c, (b_dp + (b_dd * w0)[:, None]) * (1. + b_s), 0.) * (scale * scale)
        b_A = tl.where(m_c, 1. + b_s + 0.5 * b_s * b_s, 0.)
        b_dv = _mm(tl.trans(b_A), b_do, b_v, HI, PREC)
        b_dk = _mm(tl.trans(b_dS), b_q, b_v, HI, PREC)
        # the gradient of the state after the step
        g_k, g_v = _dkdv_from_state(b_k, b_v, w0, b_sl, b_zl, feat, 0, F, BK, BL, SDT, PREC)
        b_dk += g_k
        b_dv += g_v
        g_k, g_v = _dkdv_from_state(b_k, b_v, w0, b_sr, b_zr, feat, BL, F, BK, BR, SDT, PREC)
        b_dk += g_k
        b_dv += g_v
        tl.store(dk + i_v.to(tl.int64) * s_gn + i_b * s_gb + i_h * s_gh + o_tt[:, None] * s_gt + o_k[None, :],
                 b_dk.to(dk.dtype.element_ty), mask=m_t[:, None] & m_k[None, :])
        tl.store(dv + i_b * s_db + i_h * s_dh + o_tt[:, None] * s_dt + o_v[None, :], b_dv.to(dv.dtype.element_ty),
                 mask=m_tv)
        b_qt = _step_tokens(q, i_b, i_h, s_qb, s_qt, s_qh, o_tt, m_t, o_k, m_k, TRANS=True)
        b_sl, b_sr, b_zl, b_zr = _walk(b_qt, b_do, b_dd, b_sl, b_sr, b_zl, b_zr, feat, F, BK, BL, BR, SDT, PREC)
    if STORE_H0:
        _store_state(dh0s, dh0z, i_st, b_sl, b_sr, b_zl, b_zr, o_v, m_v, i_v, D, DV, BL, BR)


@triton.jit
def taylor_prep_kernel(o, dy, den, dd, s_ob, s_ot, s_oh, s_yb, s_yt, s_yh, T, H,
                       DV: tl.constexpr, BT: tl.constexpr, BDV: tl.constexpr):
    """``dd_t = -(dy_t . y_t) / den_t`` for a block of tokens of one (batch row, head)."""
    i_t, i_bh = tl.program_id(0), tl.program_id(1)
    i_b = (i_bh // H).to(tl.int64)
    i_h = i_bh % H
    o_t = i_t.to(tl.int64) * BT + tl.arange(0, BT)
    m_t = o_t < T
    o_v = tl.arange(0, BDV)
    m = m_t[:, None] & (o_v < DV)[None, :]
    b_o = tl.load(o + i_b * s_ob + i_h * s_oh + o_t[:, None] * s_ot + o_v[None, :], mask=m, other=0.)
    b_dy = tl.load(dy + i_b * s_yb + i_h * s_yh + o_t[:, None] * s_yt + o_v[None, :], mask=m, other=0.)
    p_d = (i_b * T + o_t) * H + i_h
    b_den = tl.load(den + p_d, mask=m_t, other=1.)
    b_dd = -tl.sum(b_o.to(tl.float32) * b_dy.to(tl.float32), 1) / b_den
    tl.store(dd + p_d, b_dd, mask=m_t)


@triton.jit
def taylor_chunk_grad_kernel(
    q, k, v, dy, den, dd, hc, zc, dhc, dzc, dq, dk, dv, cu_seqlens, chunk_meta, feat,
    s_qb, s_qt, s_qh, s_kb, s_kt, s_kh, s_vb, s_vt, s_vh, s_yb, s_yt, s_yh,
    s_gn, s_gb, s_gt, s_gh, s_db, s_dt, s_dh,
    T, H, NC, scale,
    F: tl.constexpr, DV: tl.constexpr, BK: tl.constexpr, BT: tl.constexpr, BF: tl.constexpr,
    BV: tl.constexpr, NF: tl.constexpr, IS_VARLEN: tl.constexpr, HI: tl.constexpr, PREC: tl.constexpr,
    PART: tl.constexpr = 0,
):
    """dq, dk (partials of value block i_v, raw-input space) and dv of one chunk. PART 0: all three; 1: dq alone
    (the intra-chunk dS K and the state before the chunk); 2: dk and dv alone (A^T dO, dS^T Q and the gradient of
    the state after the chunk): the pass split in two kernels that each keep fewer tiles live."""
    D: tl.constexpr = 1 + F + F * (F + 1) // 2
    i_v, i_c, i_h = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    p_st = i_c.to(tl.int64) * H + i_h
    i_b, o_t, o_tt, m_t, o_k, m_tk, o_v, m_v, b_q, b_k, b_v, _, _, _ = _load_chunk(
        q, k, v, i_v, i_c, cu_seqlens, chunk_meta, s_qb, s_qt, s_qh, s_kb, s_kt, s_kh, s_vb, s_vt, s_vh,
        T, H, NC, F, DV, BK, BT, BV, IS_VARLEN)
    w0 = (i_v == 0).to(tl.float32)  # the normaliser column [v | 1] belongs to value block 0
    m_tv = m_t[:, None] & m_v[None, :]
    b_dy = tl.load(dy + i_b * s_yb + i_h * s_yh + o_tt[:, None] * s_yt + o_v[None, :], mask=m_tv, other=0.)
    p_d = (i_b * T + o_tt) * H + i_h
    b_den = tl.load(den + p_d, mask=m_t, other=1.)
    b_dd = tl.load(dd + p_d, mask=m_t, other=0.) * w0
    b_do = (b_dy.to(tl.float32) / b_den[:, None]).to(b_v.dtype)

    # intra-chunk. A NaN in k or v of token t must not reach dq of earlier tokens: dS is masked as a whole (s, dO v^T
    # may be NaN in masked pairs), and k enters dS K with its non-finite values zeroed, the pairs that see them
    # carrying the NaN in dS (_jit_common). The zeroed k also serves the state terms below: the rows it changes
    # have NaN dk, dv from their diagonal pair anyway. (dv, dk of a key get only the queries at or after it: a NaN
    # there comes from a token after the key.)
    m_c = (o_t[:, None] >= o_t[None, :]) & m_t[None, :] & m_t[:, None]
    b_s = tl.dot(b_q, tl.trans(b_k), input_precision=PREC) * (scale * scale)
    b_k = finite_rows(b_k)[0]
    # d/d(q_raw . k_raw)
    b_dp = tl.dot(b_do, tl.trans(b_v), input_precision=PREC)
    b_dS = tl.where(m_c, (b_dp + b_dd[:, None]) * (1. + b_s), 0.) * (scale * scale)
    if PART != 2:
        b_dq = _mm(b_dS, b_k, b_v, HI, PREC)
    if PART != 1:
        b_A = tl.where(m_c, 1. + b_s + 0.5 * b_s * b_s, 0.)
        b_dv = _mm(tl.trans(b_A), b_do, b_v, HI, PREC)
        b_dk = _mm(tl.trans(b_dS), b_q, b_v, HI, PREC)
    # inter-chunk: dq from the state before the chunk, dk and dv from the gradient of the state after it
    for i_f in range(0, NF):
        o_r, m_r, a, b, c = _feature_rows(feat, i_f, F, BF)
        m_rv = m_r[:, None] & m_v[None, :]
        p_h = (p_st * D + o_r[:, None]) * DV + o_v[None, :]
        if PART != 2:
            b_h = tl.load(hc + p_h, mask=m_rv, other=0.)
            b_z = tl.load(zc + p_st * D + o_r, mask=m_r, other=0.)
            b_wq = tl.dot(b_do.to(b_h.dtype), tl.trans(b_h), input_precision=PREC) + b_dd[:, None] * b_z[None, :]
            b_xa, b_xb = _expand(b_q, a, b, BK)
            b_dq += _phi_vjp(b_wq, b_xa, b_xb, a, b, c, BK, PREC)
        if PART != 1:
            b_dh = tl.load(dhc + p_h, mask=m_rv, other=0.)
            b_dz = tl.load(dzc + p_st * D + o_r, mask=m_r, other=0.)
            b_xa, b_xb = _expand(b_k, a, b, BK)
            b_dv += tl.dot((b_xa * b_xb * c[None, :]).to(b_dh.dtype), b_dh, input_precision=PREC)
            b_wk = tl.dot(b_v.to(b_dh.dtype), tl.trans(b_dh), input_precision=PREC) + w0 * b_dz[None, :]
            b_dk += _phi_vjp(b_wk, b_xa, b_xb, a, b, c, BK, PREC)
    p_g = i_v.to(tl.int64) * s_gn + i_b * s_gb + i_h * s_gh + o_tt[:, None] * s_gt + o_k[None, :]
    if PART != 2:
        tl.store(dq + p_g, b_dq.to(dq.dtype.element_ty), mask=m_tk)
    if PART != 1:
        tl.store(dk + p_g, b_dk.to(dk.dtype.element_ty), mask=m_tk)
        tl.store(dv + i_b * s_db + i_h * s_dh + o_tt[:, None] * s_dt + o_v[None, :], b_dv.to(dv.dtype.element_ty),
                 mask=m_tv)
