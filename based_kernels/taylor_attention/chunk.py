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
     product plus ``phi(Q_c) hc_c`` feature block by feature block, normalised (with ops.OUTPUT_SPLIT the second
     term comes from ``taylor_chunk_state_part_kernel``, launched before it).
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

from .._jit_common import finite_rows, flag_non_finite, grid_program, grid_program3

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
    D: tl.constexpr = 1 + F + F * (F + 1) // 2
    o_r = i_f * BF + tl.arange(0, BF)
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
def _chunk_program(DV: tl.constexpr, BV: tl.constexpr):
    """(value block, chunk, head) of a program of the output, state-part and gradient kernels, whose grid is
    (value blocks of BV columns x chunks, heads): a chunk's value blocks adjacent on the first axis, as on an axis
    of their own. The first axis takes 2^31 - 1 programs, the others CUDA's 65535, which on the chunks' axis would
    cap a call at 65535 chunks (8.4M tokens at chunk 128). With query blocks the "chunk" is chunk x query block."""
    NV: tl.constexpr = (DV + BV - 1) // BV
    i_v, i_c = grid_program(NV)
    return i_v, i_c, tl.program_id(1)


@triton.jit
def _load_chunk(q, k, v, i_v, i_c, i_h, cu_seqlens, chunk_meta, s_qb, s_qt, s_qh, s_kb, s_kt, s_kh, s_vb, s_vt,
                s_vh, T, H, NC, F: tl.constexpr, DV: tl.constexpr, BK: tl.constexpr, BT: tl.constexpr,
                BV: tl.constexpr, IS_VARLEN: tl.constexpr, i_q=0, BQ: tl.constexpr = 0):
    """Indices, masks and the q, k (raw) and v tiles of chunk i_c, value block i_v (output and gradient passes).
    k and v: the chunk's BT token rows (``o_t``, ``o_tt``, ``m_t``); q: the BQ rows from ``i_q * BQ`` (``o_q``,
    ``o_tq``, ``m_q``; BQ 0: the whole chunk)."""
    i_b, t0, eos = _chunk(i_c, cu_seqlens, chunk_meta, T, NC, BT, IS_VARLEN)
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
    # programs (feature block, value block, sequence x head x group) on the grid's first axis, feature blocks
    # adjacent: CUDA's 65535 programs on the other axes would cap sequences x heads x groups (documents with cu_seqlens)
    NF: tl.constexpr = (D + BF - 1) // BF
    NV: tl.constexpr = (DV + BV - 1) // BV
    i_f, i_v, i_nhg = grid_program3(NF, NV)
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
def _state_part(b_num, b_den, b_q, hc, hl, zc, feat, p_st, o_v, m_v, F: tl.constexpr, DV: tl.constexpr,
                BK: tl.constexpr, BF: tl.constexpr, NF: tl.constexpr, BL: tl.constexpr, PREC: tl.constexpr,
                LOW_PREC: tl.constexpr):
    """``b_num += phi(Q) hc_c``, ``b_den += phi(Q) zc_c`` for query rows ``b_q`` of the chunk whose state is at
    ``p_st`` (value columns ``o_v``): the constant and linear rows from their fp32 copy ``hl`` (``LOW_PREC``), the
    quadratic rows from ``hc`` feature block by feature block (``PREC``)."""
    D: tl.constexpr = 1 + F + F * (F + 1) // 2
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
    return b_num, b_den


@triton.jit
def taylor_chunk_state_part_kernel(
    q, hc, hl, zc, nump, denp, cu_seqlens, chunk_meta, feat, s_qb, s_qt, s_qh, T, H, NC,
    F: tl.constexpr, DV: tl.constexpr, BK: tl.constexpr, BT: tl.constexpr, BF: tl.constexpr,
    BV: tl.constexpr, NF: tl.constexpr, IS_VARLEN: tl.constexpr, BL: tl.constexpr, PREC: tl.constexpr,
    LOW_PREC: tl.constexpr,
):
    """The output pass's state part alone (ops.OUTPUT_SPLIT), programs (value block, chunk, head): ``phi(Q_c) .
    (hc_c, zc_c)`` of the chunk's query rows into fp32 ``nump [chunks, H, BT, d_v]`` and ``denp [chunks, H, BT]``
    (each program's rows contiguous), which ``taylor_chunk_output_kernel`` (PARTIAL) adds to the intra-chunk part.
    Each kernel then holds either the intra-chunk score tiles or the feature tiles, not both, for the partial sums'
    round trip through memory."""
    i_v, i_c, i_h = _chunk_program(DV, BV)
    i_b, t0, eos = _chunk(i_c, cu_seqlens, chunk_meta, T, NC, BT, IS_VARLEN)
    p_st = i_c.to(tl.int64) * H + i_h
    o_tt = t0 + tl.arange(0, BT)
    m_t = o_tt < eos
    o_k = tl.arange(0, BK)
    o_v = i_v * BV + tl.arange(0, BV)
    m_v = o_v < DV
    b_q = tl.load(q + i_b * s_qb + i_h * s_qh + o_tt[:, None] * s_qt + o_k[None, :],
                  mask=m_t[:, None] & (o_k < F)[None, :], other=0.)
    b_num, b_den = _state_part(tl.zeros([BT, BV], dtype=tl.float32), tl.zeros([BT], dtype=tl.float32), b_q, hc, hl,
                               zc, feat, p_st, o_v, m_v, F, DV, BK, BF, NF, BL, PREC, LOW_PREC)
    p_p = p_st * BT + tl.arange(0, BT)
    tl.store(nump + p_p[:, None] * DV + o_v[None, :], b_num, mask=m_t[:, None] & m_v[None, :])
    tl.store(denp + p_p, b_den, mask=m_t & (i_v == 0))


@triton.jit
def taylor_chunk_output_kernel(
    q, k, v, o, den, hc, hl, zc, cu_seqlens, chunk_meta, bad, feat, nump, denp,
    s_qb, s_qt, s_qh, s_kb, s_kt, s_kh, s_vb, s_vt, s_vh, s_ob, s_ot, s_oh,
    T, H, NC, scale, eps,
    F: tl.constexpr, DV: tl.constexpr, BK: tl.constexpr, BT: tl.constexpr, BF: tl.constexpr,
    BV: tl.constexpr, NF: tl.constexpr, IS_VARLEN: tl.constexpr, HI_INTRA: tl.constexpr,
    BL: tl.constexpr, PREC: tl.constexpr, LOW_PREC: tl.constexpr, CONFINE: tl.constexpr, BQ: tl.constexpr = 0,
    PARTIAL: tl.constexpr = False,
):
    """Output of BQ query rows of one chunk (BQ 0: the whole chunk; programs (value block, chunk x query block,
    head), the query blocks of a chunk adjacent): intra-chunk ``(1 + s + s^2/2)`` part over the chunk's keys plus
    ``phi(Q) . (hc_c, zc_c)``. The constant and linear rows (the largest terms: the constant row is the running sum
    of v) come from their fp32 copy ``hl`` in a 3-pass tf32 product (~fp32; ``LOW_PREC``, IEEE when PREC is); the
    quadratic rows from the bf16 ``hc`` on bf16 tensor cores. ``PREC``: the input_precision of the other products
    with fp32 operands (_common.dot_precision: IEEE for fp32 inputs at torch's default float32 matmul precision, else
    tf32). Query blocks (BQ < BT) keep [BQ, BT] scores and [BQ, BF] features live instead of [BT, BT] and [BT, BF]:
    fewer registers per program, for k, v and the chunk's state read once per block (from L2). ``PARTIAL``: the
    state part is not computed here but read (fp32 ``nump [chunks, H, BT, d_v]``, ``denp [chunks, H, BT]``) from
    ``taylor_chunk_state_part_kernel``, which ran before (ops.OUTPUT_SPLIT). Launched plain, then with ``CONFINE``
    (``_common.launch_confined``)."""
    if CONFINE:  # the confining re-launch: only after a plain program flagged a non-finite result
        if tl.load(bad) == 0:
            return
    NQ: tl.constexpr = 1 if BQ == 0 else BT // BQ
    i_v, i_cq, i_h = _chunk_program(DV, BV)
    i_c, i_q = i_cq // NQ, i_cq % NQ
    p_st = i_c.to(tl.int64) * H + i_h
    i_b, o_t, o_tt, m_t, o_k, m_tk, o_v, m_v, b_q, b_k, b_v, o_q, o_tq, m_q = _load_chunk(
        q, k, v, i_v, i_c, i_h, cu_seqlens, chunk_meta, s_qb, s_qt, s_qh, s_kb, s_kt, s_kh, s_vb, s_vt, s_vh,
        T, H, NC, F, DV, BK, BT, BV, IS_VARLEN, i_q, BQ)
    if PARTIAL:  # the state part from taylor_chunk_state_part_kernel, loaded before the intra-chunk products
        p_p = p_st * BT + o_q
        b_pnum = tl.load(nump + p_p[:, None] * DV + o_v[None, :], mask=m_q[:, None] & m_v[None, :], other=0.)
        b_pden = tl.load(denp + p_p, mask=m_q, other=0.)

    b_s = tl.dot(b_q, tl.trans(b_k), input_precision=PREC) * (scale * scale)
    m_c = (o_q[:, None] >= o_t[None, :]) & m_t[None, :]
    b_A = tl.where(m_c, 1. + b_s + 0.5 * b_s * b_s, 0.)
    b_w = b_A
    if CONFINE:  # a non-finite v row reaches only the queries that see it, through A (not 0 * NaN: _jit_common)
        b_v, b_vnan = finite_rows(b_v)
        b_w = tl.where(m_c, b_A + b_vnan[None, :], 0.)
    b_num = _mm(b_w, b_v, b_v, HI_INTRA, PREC)
    b_den = tl.sum(b_A, 1)
    if PARTIAL:
        b_num += b_pnum
        b_den += b_pden
    else:
        b_num, b_den = _state_part(b_num, b_den, b_q, hc, hl, zc, feat, p_st, o_v, m_v, F, DV, BK, BF, NF, BL, PREC,
                                   LOW_PREC)
    b_o = b_num / (b_den + eps)[:, None]
    tl.store(o + i_b * s_ob + i_h * s_oh + o_tq[:, None] * s_ot + o_v[None, :], b_o.to(o.dtype.element_ty),
             mask=m_q[:, None] & m_v[None, :])
    tl.store(den + (i_b * T + o_tq) * H + i_h, b_den, mask=m_q & (i_v == 0))
    if not CONFINE:
        flag_non_finite(bad, b_o, b_den, m_q)


@triton.jit
def taylor_prep_kernel(o, dy, den, dd, s_ob, s_ot, s_oh, s_yb, s_yt, s_yh, T, H,
                       DV: tl.constexpr, BT: tl.constexpr, BDV: tl.constexpr):
    """``dd_t = -(dy_t . y_t) / den_t`` for a block of tokens of one (batch row, head)."""
    i_t, i_bh = grid_program(tl.cdiv(T, BT))
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
    i_v, i_c, i_h = _chunk_program(DV, BV)
    p_st = i_c.to(tl.int64) * H + i_h
    i_b, o_t, o_tt, m_t, o_k, m_tk, o_v, m_v, b_q, b_k, b_v, _, _, _ = _load_chunk(
        q, k, v, i_v, i_c, i_h, cu_seqlens, chunk_meta, s_qb, s_qt, s_qh, s_kb, s_kt, s_kh, s_vb, s_vt, s_vh,
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
