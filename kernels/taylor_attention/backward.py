"""Triton backward kernels of Taylor linear attention.

With ``y_t = num_t / den_t`` the backward is that of an unnormalised linear attention with values
``[v | 1]`` and output gradient ``G_t = [do_t | dd_t]``, ``do_t = dy_t / den_t``, ``dd_t = -(dy_t . y_t) / den_t``
(``dd`` comes from a small preprocessing kernel; ``den`` was stored by the forward). Then

* dq: a forward pass over chunks with the forward state ``(S, z)``: ``dq'_t = d/dq' [phi(q'_t) . (S G_t)]``
  plus the intra-chunk ``sum_j (1 + s_tj) (G_t . [v_j | 1]) k'_j``;
* dk, dv: a reverse pass with the state gradient ``dS = sum_{t later} phi(q'_t) do_t^T``,
  ``dz = sum phi(q'_t) dd_t`` (plus the gradient of the final state), which also gives d initial_state.

Programs split d_v in blocks like the forward; dq and dk get one fp32 partial per block, summed afterwards
(deterministic: no atomics). The ``1`` column of the values (the normaliser) is handled by block 0 only.
"""
from __future__ import annotations

import triton
import triton.language as tl

from .forward import _mm, _quad, _quad_vjp, _state_rows, _work_item


@triton.jit
def taylor_bwd_prep_kernel(o, dy, den, dd, s_ob, s_ot, s_oh, s_yb, s_yt, s_yh, T, H,
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
def taylor_bwd_dq_kernel(
    q, k, v, dy, den, dd, h0s, h0z, dq, cu_seqlens,
    s_qb, s_qt, s_qh, s_kb, s_kt, s_kh, s_vb, s_vt, s_vh, s_yb, s_yt, s_yh, s_gn, s_gb, s_gt, s_gh,
    T, H, NS, L_SEG, scale,
    F: tl.constexpr, DV: tl.constexpr, BK: tl.constexpr, BT: tl.constexpr, BV: tl.constexpr,
    USE_H0: tl.constexpr, IS_VARLEN: tl.constexpr, HI: tl.constexpr,
):
    D: tl.constexpr = 1 + F + F * F
    i_v, i_n, i_h = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    i_b, bos, eos = _work_item(i_n, cu_seqlens, T, NS, L_SEG, IS_VARLEN)
    i_st = i_n.to(tl.int64) * H + i_h
    w0 = (i_v == 0).to(tl.float32)

    o_t = tl.arange(0, BT)
    o_k = tl.arange(0, BK)
    m_k = o_k < F
    o_v = i_v * BV + tl.arange(0, BV)
    m_v = o_v < DV
    r_1, m_1, r_2, m_2 = _state_rows(F, BK)
    m_c = (o_t[:, None] >= o_t[None, :])

    # the constant feature has no gradient w.r.t. q: only the linear and quadratic rows of (S, z) are needed
    b_h1 = tl.zeros([BK, BV], dtype=tl.float32)
    b_h2 = tl.zeros([BK * BK, BV], dtype=tl.float32)
    b_z1 = tl.zeros([BK], dtype=tl.float32)
    b_z2 = tl.zeros([BK * BK], dtype=tl.float32)
    if USE_H0:
        p_s = h0s + i_st * D * DV
        p_z = h0z + i_st * D
        b_h1 += tl.load(p_s + r_1[:, None] * DV + o_v[None, :], mask=m_1[:, None] & m_v[None, :], other=0.)
        b_h2 += tl.load(p_s + r_2[:, None] * DV + o_v[None, :], mask=m_2[:, None] & m_v[None, :], other=0.)
        b_z1 += tl.load(p_z + r_1, mask=m_1, other=0.)
        b_z2 += tl.load(p_z + r_2, mask=m_2, other=0.)

    p_q0 = q + i_b * s_qb + i_h * s_qh
    p_k0 = k + i_b * s_kb + i_h * s_kh
    p_v0 = v + i_b * s_vb + i_h * s_vh
    p_y0 = dy + i_b * s_yb + i_h * s_yh
    p_g0 = dq + i_v.to(tl.int64) * s_gn + i_b * s_gb + i_h * s_gh
    for t0 in range(bos, eos, BT):
        o_tt = t0 + o_t
        m_t = o_tt < eos
        m_tk = m_t[:, None] & m_k[None, :]
        m_tv = m_t[:, None] & m_v[None, :]
        b_q = tl.load(p_q0 + o_tt[:, None] * s_qt + o_k[None, :], mask=m_tk, other=0.)
        b_k = tl.load(p_k0 + o_tt[:, None] * s_kt + o_k[None, :], mask=m_tk, other=0.)
        b_v = tl.load(p_v0 + o_tt[:, None] * s_vt + o_v[None, :], mask=m_tv, other=0.)
        b_dy = tl.load(p_y0 + o_tt[:, None] * s_yt + o_v[None, :], mask=m_tv, other=0.)
        p_d = (i_b * T + o_tt) * H + i_h
        b_den = tl.load(den + p_d, mask=m_t, other=1.)
        b_ddv = tl.load(dd + p_d, mask=m_t, other=0.) * w0
        b_do = b_dy.to(tl.float32) / b_den[:, None]
        b_qs = b_q.to(tl.float32) * scale
        b_ks = b_k.to(tl.float32) * scale
        # intra-chunk: dK/dq' = (1 + s) k'
        b_s = tl.dot(b_q, tl.trans(b_k)) * (scale * scale)
        b_dA = _mm(b_do, tl.trans(b_v), b_v, HI) + b_ddv[:, None]
        b_dS = tl.where(m_c & m_t[None, :], (1. + b_s) * b_dA, 0.)
        b_dq = _mm(b_dS, b_ks, b_v, HI)
        # inter-chunk: g = S [do | dd], then the Jacobian of phi at q'
        b_g1 = tl.dot(b_do, tl.trans(b_h1)) + b_ddv[:, None] * b_z1[None, :]
        b_g2 = _mm(b_do, tl.trans(b_h2), b_v, HI) + b_ddv[:, None] * b_z2[None, :]
        b_dq += b_g1 + _quad_vjp(b_g2, b_qs, BT, BK)
        tl.store(p_g0 + o_tt[:, None] * s_gt + o_k[None, :], b_dq * scale, mask=m_tk)
        # the forward state, advanced past this chunk
        b_kk = _quad(b_ks, BT, BK)
        b_h1 += tl.dot(tl.trans(b_ks), b_v.to(tl.float32))
        b_h2 += _mm(tl.trans(b_kk), b_v, b_v, HI)
        b_z1 += tl.sum(b_ks, 0)
        b_z2 += tl.sum(b_kk, 0)


@triton.jit
def taylor_bwd_dkv_kernel(
    q, k, v, dy, den, dd, dhts, dhtz, dh0s, dh0z, dk, dv, cu_seqlens,
    s_qb, s_qt, s_qh, s_kb, s_kt, s_kh, s_vb, s_vt, s_vh, s_yb, s_yt, s_yh, s_gn, s_gb, s_gt, s_gh,
    s_eb, s_et, s_eh,
    T, H, NS, L_SEG, scale,
    F: tl.constexpr, DV: tl.constexpr, BK: tl.constexpr, BT: tl.constexpr, BV: tl.constexpr,
    USE_DHT: tl.constexpr, STORE_DH0: tl.constexpr, IS_VARLEN: tl.constexpr, HI: tl.constexpr,
):
    D: tl.constexpr = 1 + F + F * F
    i_v, i_n, i_h = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    i_b, bos, eos = _work_item(i_n, cu_seqlens, T, NS, L_SEG, IS_VARLEN)
    i_st = i_n.to(tl.int64) * H + i_h
    w0 = (i_v == 0).to(tl.float32)

    o_t = tl.arange(0, BT)
    o_k = tl.arange(0, BK)
    m_k = o_k < F
    o_v = i_v * BV + tl.arange(0, BV)
    m_v = o_v < DV
    r_1, m_1, r_2, m_2 = _state_rows(F, BK)
    o_1 = tl.arange(0, 1)
    m_c = (o_t[:, None] >= o_t[None, :])

    # gradient of the state after this chunk (from later chunks and from the final state)
    b_h0 = tl.zeros([BV], dtype=tl.float32)
    b_h1 = tl.zeros([BK, BV], dtype=tl.float32)
    b_h2 = tl.zeros([BK * BK, BV], dtype=tl.float32)
    b_z0 = tl.zeros([1], dtype=tl.float32)
    b_z1 = tl.zeros([BK], dtype=tl.float32)
    b_z2 = tl.zeros([BK * BK], dtype=tl.float32)
    if USE_DHT:
        p_s = dhts + i_st * D * DV
        p_z = dhtz + i_st * D
        b_h0 += tl.load(p_s + o_v, mask=m_v, other=0.)
        b_h1 += tl.load(p_s + r_1[:, None] * DV + o_v[None, :], mask=m_1[:, None] & m_v[None, :], other=0.)
        b_h2 += tl.load(p_s + r_2[:, None] * DV + o_v[None, :], mask=m_2[:, None] & m_v[None, :], other=0.)
        b_z0 += tl.load(p_z + o_1)
        b_z1 += tl.load(p_z + r_1, mask=m_1, other=0.)
        b_z2 += tl.load(p_z + r_2, mask=m_2, other=0.)

    p_q0 = q + i_b * s_qb + i_h * s_qh
    p_k0 = k + i_b * s_kb + i_h * s_kh
    p_v0 = v + i_b * s_vb + i_h * s_vh
    p_y0 = dy + i_b * s_yb + i_h * s_yh
    p_g0 = dk + i_v.to(tl.int64) * s_gn + i_b * s_gb + i_h * s_gh
    p_e0 = dv + i_b * s_eb + i_h * s_eh
    NT = tl.cdiv(eos - bos, BT)
    for i_t in range(0, NT):
        t0 = bos + (NT - 1 - i_t) * BT
        o_tt = t0 + o_t
        m_t = o_tt < eos
        m_tk = m_t[:, None] & m_k[None, :]
        m_tv = m_t[:, None] & m_v[None, :]
        b_q = tl.load(p_q0 + o_tt[:, None] * s_qt + o_k[None, :], mask=m_tk, other=0.)
        b_k = tl.load(p_k0 + o_tt[:, None] * s_kt + o_k[None, :], mask=m_tk, other=0.)
        b_v = tl.load(p_v0 + o_tt[:, None] * s_vt + o_v[None, :], mask=m_tv, other=0.)
        b_dy = tl.load(p_y0 + o_tt[:, None] * s_yt + o_v[None, :], mask=m_tv, other=0.)
        p_d = (i_b * T + o_tt) * H + i_h
        b_den = tl.load(den + p_d, mask=m_t, other=1.)
        b_dd = tl.load(dd + p_d, mask=m_t, other=0.)
        b_ddv = b_dd * w0
        b_do = b_dy.to(tl.float32) / b_den[:, None]
        b_qs = b_q.to(tl.float32) * scale
        b_ks = b_k.to(tl.float32) * scale
        # intra-chunk
        b_s = tl.dot(b_q, tl.trans(b_k)) * (scale * scale)
        m_s = m_c & m_t[None, :]
        b_A = tl.where(m_s, 1. + b_s + 0.5 * b_s * b_s, 0.)
        b_dv = _mm(tl.trans(b_A), b_do, b_v, HI)
        b_dA = _mm(b_do, tl.trans(b_v), b_v, HI) + b_ddv[:, None]
        b_dS = tl.where(m_s, (1. + b_s) * b_dA, 0.)
        b_dk = _mm(tl.trans(b_dS), b_qs, b_v, HI)
        # inter-chunk: keys of this chunk feed every later query through the state
        b_kk = _quad(b_ks, BT, BK)
        b_dv += b_h0[None, :] + tl.dot(b_ks, b_h1) + _mm(b_kk, b_h2, b_v, HI)
        b_g1 = tl.dot(b_v.to(tl.float32), tl.trans(b_h1)) + w0 * b_z1[None, :]
        b_g2 = _mm(b_v, tl.trans(b_h2), b_v, HI) + w0 * b_z2[None, :]
        b_dk += b_g1 + _quad_vjp(b_g2, b_ks, BT, BK)
        tl.store(p_g0 + o_tt[:, None] * s_gt + o_k[None, :], b_dk * scale, mask=m_tk)
        tl.store(p_e0 + o_tt[:, None] * s_et + o_v[None, :], b_dv.to(dv.dtype.element_ty), mask=m_tv)
        # add this chunk's queries to the state gradient
        b_qq = _quad(b_qs, BT, BK)
        b_h0 += tl.sum(b_do, 0)
        b_h1 += tl.dot(tl.trans(b_qs), b_do)
        b_h2 += _mm(tl.trans(b_qq), b_do, b_v, HI)
        b_z0 += tl.sum(b_dd, 0)
        b_z1 += tl.sum(b_qs * b_dd[:, None], 0)
        b_z2 += tl.sum(b_qq * b_dd[:, None], 0)

    if STORE_DH0:
        p_s = dh0s + i_st * D * DV
        p_z = dh0z + i_st * D
        tl.store(p_s + o_v, b_h0, mask=m_v)
        tl.store(p_s + r_1[:, None] * DV + o_v[None, :], b_h1, mask=m_1[:, None] & m_v[None, :])
        tl.store(p_s + r_2[:, None] * DV + o_v[None, :], b_h2, mask=m_2[:, None] & m_v[None, :])
        tl.store(p_z + o_1, b_z0, mask=(o_1 < 1) & (i_v == 0))
        tl.store(p_z + r_1, b_z1, mask=m_1 & (i_v == 0))
        tl.store(p_z + r_2, b_z2, mask=m_2 & (i_v == 0))
