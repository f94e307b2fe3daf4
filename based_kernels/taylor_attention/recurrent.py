"""Triton one-token decode kernel of Taylor linear attention (state update before read).

``S += phi(k) v^T; z += phi(k); y = phi(q) S / (phi(q) . z + eps)`` for one token of every (batch, head).
Memory-bound: it reads the old state once and writes the new one once, out of place (the caller's state is never
modified; programs own BV value columns of one (batch, head), block 0 also z) or in place (one program per
(batch, head) owns all of its state).
"""
from __future__ import annotations

import triton
import triton.language as tl

from .._jit_common import grid_program
from .chunk import RSQRT2, _features, _pairs


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
    """Grid ``(cdiv(DV, BV * NVB) * B * H,)`` (a 2-D grid folded, ``grid_program``): program (i, bh) takes value
    blocks ``i * NVB ... i * NVB + NVB - 1`` (BV columns each) of one (batch, head); program 0 of each (batch, head)
    also stores z. With NVB covering every value block (one program per (batch, head)), s_in / s_out and z_in /
    z_out may be the same buffers (in place): the program reads z and each state block before it stores over them,
    and no other program touches them. z and the denominator are computed once per program."""
    D: tl.constexpr = 1 + F + F * (F + 1) // 2
    i_vp, i_bh = grid_program((DV + BV * NVB - 1) // (BV * NVB))
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
def _phi(p_x, a, b, c, m_r):
    """Features ``c x_a x_b`` ``[BR]`` (fp32) of the token whose F raw values start at ``p_x``, for feature rows with
    factor columns ``a``, ``b`` (-1: the constant 1) and coefficients ``c`` (chunk._features): gathered loads of a
    few dozen bytes (from L1 after the first), where a 0/1 selection over [F, BR] would take registers."""
    x_a = tl.load(p_x + a, mask=m_r & (a >= 0), other=1.).to(tl.float32)
    x_b = tl.load(p_x + b, mask=m_r & (b >= 0), other=1.).to(tl.float32)
    return x_a * x_b * c


@triton.jit
def _load_rows(p_s, p_sq, o_r, m_r, o_v, m_v, use_copy, F: tl.constexpr, DV: tl.constexpr, HAS_COPY: tl.constexpr):
    """State rows ``o_r`` x value columns ``o_v`` (fp32), the quadratic rows (r > F) from the 16-bit copy ``sq``
    when ``use_copy``; a masked-off load moves no bytes."""
    m = m_r[:, None] & m_v[None, :]
    if HAS_COPY:
        quad = (o_r > F)[:, None]
        b_h = tl.load(p_s + o_r[:, None] * DV + o_v[None, :], mask=m & ~(quad & use_copy), other=0.)
        b_h += tl.load(p_sq + (o_r - 1 - F)[:, None] * DV + o_v[None, :], mask=m & quad & use_copy,
                       other=0.).to(tl.float32)
    else:
        b_h = tl.load(p_s + o_r[:, None] * DV + o_v[None, :], mask=m, other=0.)
    return b_h


@triton.jit
def _store_rows(p_s, p_sq, b_h, o_r, m_r, o_v, m_v, F: tl.constexpr, DV: tl.constexpr, HAS_COPY: tl.constexpr):
    """Store state rows ``o_r`` x columns ``o_v``, and the quadratic ones also to the 16-bit copy."""
    m = m_r[:, None] & m_v[None, :]
    tl.store(p_s + o_r[:, None] * DV + o_v[None, :], b_h, mask=m)
    if HAS_COPY:
        tl.store(p_sq + (o_r - 1 - F)[:, None] * DV + o_v[None, :], b_h.to(p_sq.dtype.element_ty),
                 mask=m & (o_r > F)[:, None])


@triton.jit
def taylor_step_buffered_kernel(
    q, k, v, y, s, z, kb, vb, cnt, sq,
    s_qb, s_qh, s_kb, s_kh, s_vb, s_vh,
    H, scale, eps,
    F: tl.constexpr, DV: tl.constexpr, C: tl.constexpr, BK: tl.constexpr, BA: tl.constexpr, BB: tl.constexpr,
    BC: tl.constexpr, BV: tl.constexpr, NVB: tl.constexpr, HAS_COPY: tl.constexpr,
):
    """One decode token against a state ``(s, z)`` plus a buffer of the last ``n <= C`` tokens' raw keys and values
    (``kb [BH, C, F]``, ``vb [BH, C, DV]``, ``n = cnt[bh]``; reference.taylor_attention_step_buffered), all in
    place. Grid ``(B * H,)``: one program per (batch, head) walks its NVB value blocks of BV columns. Every step
    reads the state and the buffer; the state is written only when the buffer is full (``n == C``: the buffered
    tokens and this one are folded into it and the buffer empties), else this token's k and v go to row n. A
    program reads each state block before it stores over it and no other program touches them.

    The D = 1 + F + F(F+1)/2 feature rows (chunk.py's layout) are two tiles, rows ``[0, BA)`` and ``[BA, BA +
    BB)`` (BA the largest power of two below D, BB the next power of two of the rest: 128 + 32 rows at f 16, where
    a linear and a padded quadratic block took 1 + 16 + 256): the tiles' registers bound the programs per SM and
    so the bytes in flight of this memory-bound kernel.

    ``HAS_COPY``: ``sq [BH, F(F+1)/2, DV]`` holds the state's quadratic rows in sq's (16-bit) dtype, written by
    the fold; the steps between folds read those rows from it instead of from the fp32 state."""
    D: tl.constexpr = 1 + F + F * (F + 1) // 2
    i_bh = tl.program_id(0)
    i_b = (i_bh // H).to(tl.int64)
    i_h = i_bh % H
    i_st = i_bh.to(tl.int64)
    o_k = tl.arange(0, BK)
    m_k = o_k < F
    o_c = tl.arange(0, BC)
    o_1 = tl.arange(0, 1)
    # the two tiles' rows, masks, factor columns and coefficients: computed once, reused by the read, the fold and
    # the z fold (sm_90a compile at f 16, BV 32, 4 warps: 224 registers, no spills, as with them recomputed there)
    r_a, m_a, a_a, b_a, c_a = _features(0, scale, F, BA)
    r_b, m_b, a_b, b_b, c_b = _features(BA // BB, scale, F, BB)

    n = tl.load(cnt + i_st)
    fold = n >= C
    n_rows = tl.minimum(n, C)
    m_c = o_c < n_rows
    p_q = q + i_b * s_qb + i_h * s_qh
    p_k = k + i_b * s_kb + i_h * s_kh
    b_q = tl.load(p_q + o_k, mask=m_k, other=0.).to(tl.float32) * scale
    b_kr = tl.load(p_k + o_k, mask=m_k, other=0.)
    b_k = b_kr.to(tl.float32) * scale
    p_kb = kb + i_st * C * F
    p_vb = vb + i_st * C * DV
    b_kb = tl.load(p_kb + o_c[:, None] * F + o_k[None, :], mask=m_c[:, None] & m_k[None, :],
                   other=0.).to(tl.float32) * scale
    # the kernel weights 1 + s + s^2/2 of the buffered tokens (0 on empty rows) and of this one
    b_sb = tl.sum(b_kb * b_q[None, :], 1)
    b_wb = tl.where(m_c, 1. + b_sb + 0.5 * b_sb * b_sb, 0.)
    s_cur = tl.sum(b_q * b_k, 0)
    w_cur = 1. + s_cur + 0.5 * s_cur * s_cur
    b_qa, b_qb = _phi(p_q, a_a, b_a, c_a, m_a), _phi(p_q, a_b, b_b, c_b, m_b)
    p_z = z + i_st * D
    b_den = (tl.sum(b_qa * tl.load(p_z + r_a, mask=m_a, other=0.), 0)
             + tl.sum(b_qb * tl.load(p_z + r_b, mask=m_b, other=0.), 0)) + (tl.sum(b_wb, 0) + w_cur)
    p_s = s + i_st * D * DV
    p_sq = sq + i_st * (D - 1 - F) * DV
    use_copy = n < C
    for j in range(NVB):  # a loop, not unrolled: one value block's tiles live at a time
        o_v = j * BV + tl.arange(0, BV)
        m_v = o_v < DV
        b_vr = tl.load(v + i_b * s_vb + i_h * s_vh + o_v, mask=m_v, other=0.)
        b_v = b_vr.to(tl.float32)
        b_vb = tl.load(p_vb + o_c[:, None] * DV + o_v[None, :], mask=m_c[:, None] & m_v[None, :],
                       other=0.).to(tl.float32)
        b_ha = _load_rows(p_s, p_sq, r_a, m_a, o_v, m_v, use_copy, F, DV, HAS_COPY)
        b_hb = _load_rows(p_s, p_sq, r_b, m_b, o_v, m_v, use_copy, F, DV, HAS_COPY)
        b_num = (tl.sum(b_qa[:, None] * b_ha, 0) + tl.sum(b_qb[:, None] * b_hb, 0)) + (
            tl.sum(b_wb[:, None] * b_vb, 0) + w_cur * b_v)
        tl.store(y + i_st * DV + o_v, (b_num / (b_den + eps)).to(y.dtype.element_ty), mask=m_v)
        # fold: S += phi(k_j) v_j^T for the buffered tokens and this one (fp32 rank-1 updates), their features
        # gathered again per value block and for z: keeping this token's across the loop and folding z in the
        # first block took longer per step (README, "Decode")
        if fold:
            b_ha += _phi(p_k, a_a, b_a, c_a, m_a)[:, None] * b_v[None, :]
            b_hb += _phi(p_k, a_b, b_b, c_b, m_b)[:, None] * b_v[None, :]
            for jj in range(0, n_rows):
                b_vj = tl.load(p_vb + jj * DV + o_v, mask=m_v, other=0.).to(tl.float32)
                b_ha += _phi(p_kb + jj * F, a_a, b_a, c_a, m_a)[:, None] * b_vj[None, :]
                b_hb += _phi(p_kb + jj * F, a_b, b_b, c_b, m_b)[:, None] * b_vj[None, :]
            _store_rows(p_s, p_sq, b_ha, r_a, m_a, o_v, m_v, F, DV, HAS_COPY)
            _store_rows(p_s, p_sq, b_hb, r_b, m_b, o_v, m_v, F, DV, HAS_COPY)
        else:
            tl.store(p_vb + n * DV + o_v, b_vr.to(vb.dtype.element_ty), mask=m_v)

    if fold:
        b_za = tl.load(p_z + r_a, mask=m_a, other=0.) + _phi(p_k, a_a, b_a, c_a, m_a)
        b_zb = tl.load(p_z + r_b, mask=m_b, other=0.) + _phi(p_k, a_b, b_b, c_b, m_b)
        for jj in range(0, n_rows):
            b_za += _phi(p_kb + jj * F, a_a, b_a, c_a, m_a)
            b_zb += _phi(p_kb + jj * F, a_b, b_b, c_b, m_b)
        tl.store(p_z + r_a, b_za, mask=m_a)
        tl.store(p_z + r_b, b_zb, mask=m_b)
        tl.store(cnt + i_st + o_1, tl.zeros([1], dtype=cnt.dtype.element_ty))
    else:
        tl.store(p_kb + n * F + o_k, b_kr.to(kb.dtype.element_ty), mask=m_k)
        tl.store(cnt + i_st + o_1, tl.zeros([1], dtype=cnt.dtype.element_ty) + (n + 1))
