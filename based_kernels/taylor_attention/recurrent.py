"""Triton one-token decode kernel of Taylor linear attention (state update before read).

``S += phi(k) v^T; z += phi(k); y = phi(q) S / (phi(q) . z + eps)`` for one token of every (batch, head).
Memory-bound: it reads the old state once and writes the new one once, out of place (the caller's state is never
modified; programs own BV value columns of one (batch, head), block 0 also z) or in place (one program per
(batch, head) owns all of its state).
"""
from __future__ import annotations

import triton
import triton.language as tl

from .chunk import RSQRT2, _pairs


@triton.jit
def _state_rows(F: tl.constexpr, BK: tl.constexpr, BP: tl.constexpr):
    """Row indices (into the D = 1 + F + F(F+1)/2 feature rows, chunk.py's layout) of the linear and quadratic
    blocks with their masks, and the quadratic rows' factor columns ``a <= b`` and coefficients."""
    o_k = tl.arange(0, BK)
    o_p = tl.arange(0, BP)
    m_p = o_p < F * (F + 1) // 2
    p_i, p_j = _pairs(tl.maximum(o_p - F, 0), F)
    diag = o_p < F
    a = tl.where(m_p, tl.where(diag, o_p, p_i), 0)
    b = tl.where(m_p, tl.where(diag, o_p, p_j), 0)
    c = tl.where(m_p, tl.where(diag, RSQRT2, 1.), 0.)
    return 1 + o_k, o_k < F, 1 + F + o_p, m_p, a, b, c


@triton.jit
def taylor_step_kernel(
    q, k, v, y, s_in, z_in, s_out, z_out,
    s_qb, s_qh, s_kb, s_kh, s_vb, s_vh,
    H, scale, eps,
    F: tl.constexpr, DV: tl.constexpr, BK: tl.constexpr, BP: tl.constexpr, BV: tl.constexpr,
    NVB: tl.constexpr, HAS_STATE: tl.constexpr,
):
    """Grid ``(cdiv(DV, BV * NVB), B * H)``: program (i, bh) takes value blocks ``i * NVB ... i * NVB + NVB - 1``
    (BV columns each) of one (batch, head); program 0 of each (batch, head) also stores z. With NVB covering every
    value block (one program per (batch, head)), s_in / s_out and z_in / z_out may be the same buffers (in
    place): the program reads z and each state block before it stores over them, and no other program touches
    them. z and the denominator are computed once per program."""
    D: tl.constexpr = 1 + F + F * (F + 1) // 2
    i_vp, i_bh = tl.program_id(0), tl.program_id(1)
    i_b = (i_bh // H).to(tl.int64)
    i_h = i_bh % H
    i_st = i_bh.to(tl.int64)
    o_k = tl.arange(0, BK)
    r_1, m_1, r_2, m_2, a_2, b_2, c_2 = _state_rows(F, BK, BP)
    o_1 = tl.arange(0, 1)

    p_q = q + i_b * s_qb + i_h * s_qh
    p_k = k + i_b * s_kb + i_h * s_kh
    b_q = tl.load(p_q + o_k, mask=m_1, other=0.).to(tl.float32) * scale
    b_k = tl.load(p_k + o_k, mask=m_1, other=0.).to(tl.float32) * scale
    # the quadratic features c x_a x_b, a <= b, as a flat [BP] vector; the factors are selected with 0/1 masks
    # ([BK, BP] products summed over BK: exact, and no indexed access, which would go through local memory)
    e_a = (o_k[:, None] == a_2[None, :]).to(tl.float32)
    e_b = (o_k[:, None] == b_2[None, :]).to(tl.float32)
    b_qq = tl.sum(b_q[:, None] * e_a, 0) * tl.sum(b_q[:, None] * e_b, 0) * c_2
    b_kk = tl.sum(b_k[:, None] * e_a, 0) * tl.sum(b_k[:, None] * e_b, 0) * c_2

    p_zi = z_in + i_st * D
    if HAS_STATE:
        b_z0 = tl.load(p_zi + o_1)
        b_z1 = tl.load(p_zi + r_1, mask=m_1, other=0.)
        b_z2 = tl.load(p_zi + r_2, mask=m_2, other=0.)
    else:
        b_z0 = tl.zeros([1], dtype=tl.float32)
        b_z1 = tl.zeros([BK], dtype=tl.float32)
        b_z2 = tl.zeros([BP], dtype=tl.float32)
    b_z0 += 1.
    b_z1 += b_k
    b_z2 += b_kk
    b_den = tl.sum(b_z0, 0) + tl.sum(b_q * b_z1, 0) + tl.sum(b_qq * b_z2, 0)

    p_si = s_in + i_st * D * DV
    p_so = s_out + i_st * D * DV
    for j in range(NVB):  # a loop, not unrolled: one value block's tiles live at a time
        o_v = (i_vp * NVB + j) * BV + tl.arange(0, BV)
        m_v = o_v < DV
        m_s1 = m_1[:, None] & m_v[None, :]
        m_s2 = m_2[:, None] & m_v[None, :]
        b_v = tl.load(v + i_b * s_vb + i_h * s_vh + o_v, mask=m_v, other=0.).to(tl.float32)
        if HAS_STATE:
            b_h0 = tl.load(p_si + o_v, mask=m_v, other=0.)
            b_h1 = tl.load(p_si + r_1[:, None] * DV + o_v[None, :], mask=m_s1, other=0.)
            b_h2 = tl.load(p_si + r_2[:, None] * DV + o_v[None, :], mask=m_s2, other=0.)
        else:
            b_h0 = tl.zeros([BV], dtype=tl.float32)
            b_h1 = tl.zeros([BK, BV], dtype=tl.float32)
            b_h2 = tl.zeros([BP, BV], dtype=tl.float32)
        b_h0 += b_v
        b_h1 += b_k[:, None] * b_v[None, :]
        b_h2 += b_kk[:, None] * b_v[None, :]
        b_num = b_h0 + tl.sum(b_q[:, None] * b_h1, 0) + tl.sum(b_qq[:, None] * b_h2, 0)
        tl.store(y + i_st * DV + o_v, (b_num / (b_den + eps)).to(y.dtype.element_ty), mask=m_v)
        tl.store(p_so + o_v, b_h0, mask=m_v)
        tl.store(p_so + r_1[:, None] * DV + o_v[None, :], b_h1, mask=m_s1)
        tl.store(p_so + r_2[:, None] * DV + o_v[None, :], b_h2, mask=m_s2)

    p_zo = z_out + i_st * D
    tl.store(p_zo + o_1, b_z0, mask=(o_1 < 1) & (i_vp == 0))
    tl.store(p_zo + r_1, b_z1, mask=m_1 & (i_vp == 0))
    tl.store(p_zo + r_2, b_z2, mask=m_2 & (i_vp == 0))


@triton.jit
def _buffered_row(p_kb, j, o_k, m_1, a_2, b_2, m_2, c_2, scale, F: tl.constexpr):
    """Linear and quadratic features ``([BK], [BP])`` of buffered key row j, its factors gathered from the buffer
    (a few hundred bytes, in L1 after the step's first read of it): only the fold runs this."""
    p = p_kb + j * F
    b_x = tl.load(p + o_k, mask=m_1, other=0.).to(tl.float32) * scale
    b_xa = tl.load(p + a_2, mask=m_2, other=0.).to(tl.float32)
    b_xb = tl.load(p + b_2, mask=m_2, other=0.).to(tl.float32)
    return b_x, b_xa * b_xb * (c_2 * scale * scale)


@triton.jit
def taylor_step_buffered_kernel(
    q, k, v, y, s, z, kb, vb, cnt, sq,
    s_qb, s_qh, s_kb, s_kh, s_vb, s_vh,
    H, scale, eps,
    F: tl.constexpr, DV: tl.constexpr, C: tl.constexpr, BK: tl.constexpr, BP: tl.constexpr, BC: tl.constexpr,
    BV: tl.constexpr, NVB: tl.constexpr, HAS_COPY: tl.constexpr,
):
    """One decode token against a state ``(s, z)`` plus a buffer of the last ``n <= C`` tokens' raw keys and values
    (``kb [BH, C, F]``, ``vb [BH, C, DV]``, ``n = cnt[bh]``; reference.taylor_attention_step_buffered), all in
    place. Grid ``(B * H,)``: one program per (batch, head) walks its NVB value blocks of BV columns. Every step
    reads the state and the buffer; the state is written only when the buffer is full (``n == C``: the buffered
    tokens and this one are folded into it and the buffer empties), else this token's k and v go to row n. A
    program reads each state block before it stores over it and no other program touches them.

    ``HAS_COPY``: ``sq [BH, F(F+1)/2, DV]`` holds the state's quadratic rows in sq's (16-bit) dtype, written by
    the fold; the steps between folds read those rows from it instead of from the fp32 state."""
    D: tl.constexpr = 1 + F + F * (F + 1) // 2
    P: tl.constexpr = F * (F + 1) // 2
    i_bh = tl.program_id(0)
    i_b = (i_bh // H).to(tl.int64)
    i_h = i_bh % H
    i_st = i_bh.to(tl.int64)
    o_k = tl.arange(0, BK)
    o_c = tl.arange(0, BC)
    r_1, m_1, r_2, m_2, a_2, b_2, c_2 = _state_rows(F, BK, BP)
    o_1 = tl.arange(0, 1)

    n = tl.load(cnt + i_st)
    fold = n >= C
    n_rows = tl.minimum(n, C)
    m_c = o_c < n_rows
    b_q = tl.load(q + i_b * s_qb + i_h * s_qh + o_k, mask=m_1, other=0.).to(tl.float32) * scale
    b_kr = tl.load(k + i_b * s_kb + i_h * s_kh + o_k, mask=m_1, other=0.)
    b_k = b_kr.to(tl.float32) * scale
    p_kb = kb + i_st * C * F
    p_vb = vb + i_st * C * DV
    b_kb = tl.load(p_kb + o_c[:, None] * F + o_k[None, :], mask=m_c[:, None] & m_1[None, :],
                   other=0.).to(tl.float32) * scale
    # the kernel weights 1 + s + s^2/2 of the buffered tokens (0 on empty rows) and of this one
    b_sb = tl.sum(b_kb * b_q[None, :], 1)
    b_wb = tl.where(m_c, 1. + b_sb + 0.5 * b_sb * b_sb, 0.)
    s_cur = tl.sum(b_q * b_k, 0)
    w_cur = 1. + s_cur + 0.5 * s_cur * s_cur
    e_a = (o_k[:, None] == a_2[None, :]).to(tl.float32)
    e_b = (o_k[:, None] == b_2[None, :]).to(tl.float32)
    b_qq = tl.sum(b_q[:, None] * e_a, 0) * tl.sum(b_q[:, None] * e_b, 0) * c_2
    b_kk = tl.sum(b_k[:, None] * e_a, 0) * tl.sum(b_k[:, None] * e_b, 0) * c_2

    p_z = z + i_st * D
    b_z0 = tl.load(p_z + o_1)
    b_z1 = tl.load(p_z + r_1, mask=m_1, other=0.)
    b_z2 = tl.load(p_z + r_2, mask=m_2, other=0.)
    b_den = (tl.sum(b_z0, 0) + tl.sum(b_q * b_z1, 0) + tl.sum(b_qq * b_z2, 0)) + (tl.sum(b_wb, 0) + w_cur)
    p_s = s + i_st * D * DV
    p_sq = sq + i_st * P * DV
    for j in range(NVB):  # a loop, not unrolled: one value block's tiles live at a time
        o_v = j * BV + tl.arange(0, BV)
        m_v = o_v < DV
        m_s1 = m_1[:, None] & m_v[None, :]
        m_s2 = m_2[:, None] & m_v[None, :]
        b_vr = tl.load(v + i_b * s_vb + i_h * s_vh + o_v, mask=m_v, other=0.)
        b_v = b_vr.to(tl.float32)
        b_vb = tl.load(p_vb + o_c[:, None] * DV + o_v[None, :], mask=m_c[:, None] & m_v[None, :],
                       other=0.).to(tl.float32)
        b_h0 = tl.load(p_s + o_v, mask=m_v, other=0.)
        b_h1 = tl.load(p_s + r_1[:, None] * DV + o_v[None, :], mask=m_s1, other=0.)
        if HAS_COPY:
            if fold:
                b_h2 = tl.load(p_s + r_2[:, None] * DV + o_v[None, :], mask=m_s2, other=0.)
            else:
                b_h2 = tl.load(p_sq + (r_2 - 1 - F)[:, None] * DV + o_v[None, :], mask=m_s2,
                               other=0.).to(tl.float32)
        else:
            b_h2 = tl.load(p_s + r_2[:, None] * DV + o_v[None, :], mask=m_s2, other=0.)
        b_num = (b_h0 + tl.sum(b_q[:, None] * b_h1, 0) + tl.sum(b_qq[:, None] * b_h2, 0)) + (
            tl.sum(b_wb[:, None] * b_vb, 0) + w_cur * b_v)
        tl.store(y + i_st * DV + o_v, (b_num / (b_den + eps)).to(y.dtype.element_ty), mask=m_v)
        if fold:  # S += phi(k_j) v_j^T for the buffered tokens and this one: fp32 rank-1 updates
            b_h0 += b_v
            b_h1 += b_k[:, None] * b_v[None, :]
            b_h2 += b_kk[:, None] * b_v[None, :]
            for jj in range(0, n_rows):
                b_xj, b_xxj = _buffered_row(p_kb, jj, o_k, m_1, a_2, b_2, m_2, c_2, scale, F)
                b_vj = tl.load(p_vb + jj * DV + o_v, mask=m_v, other=0.).to(tl.float32)
                b_h0 += b_vj
                b_h1 += b_xj[:, None] * b_vj[None, :]
                b_h2 += b_xxj[:, None] * b_vj[None, :]
            tl.store(p_s + o_v, b_h0, mask=m_v)
            tl.store(p_s + r_1[:, None] * DV + o_v[None, :], b_h1, mask=m_s1)
            tl.store(p_s + r_2[:, None] * DV + o_v[None, :], b_h2, mask=m_s2)
            if HAS_COPY:
                tl.store(p_sq + (r_2 - 1 - F)[:, None] * DV + o_v[None, :], b_h2.to(sq.dtype.element_ty),
                         mask=m_s2)
        else:
            tl.store(p_vb + n * DV + o_v, b_vr.to(vb.dtype.element_ty), mask=m_v)

    if fold:
        b_z1 += tl.sum(b_kb, 0) + b_k
        b_z2 += b_kk
        for jj in range(0, n_rows):
            b_z2 += _buffered_row(p_kb, jj, o_k, m_1, a_2, b_2, m_2, c_2, scale, F)[1]
        tl.store(p_z + o_1, b_z0 + (n_rows + 1).to(tl.float32))
        tl.store(p_z + r_1, b_z1, mask=m_1)
        tl.store(p_z + r_2, b_z2, mask=m_2)
        tl.store(cnt + i_st + o_1, tl.zeros([1], dtype=cnt.dtype.element_ty))
    else:
        tl.store(p_kb + n * F + o_k, b_kr.to(kb.dtype.element_ty), mask=m_1)
        tl.store(cnt + i_st + o_1, tl.zeros([1], dtype=cnt.dtype.element_ty) + (n + 1))
