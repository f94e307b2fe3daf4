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
The Jacobian of the quadratic features, ``d/dx' [g . x' (x) x' / sqrt(2)] = (G + G^T) x' / sqrt(2)``, is taken
group by group as two small products with constant 0/1 matrices that sum the flat features ``a*BK + b`` over b
(resp. a), so no 3-D tile is formed.
"""
from __future__ import annotations

import triton
import triton.language as tl

from .forward import (RSQRT2, _dot_ieee, _gather, _group, _load_state, _mm, _qq, _store_state, _work_item,
                      _zero_state)


@triton.jit
def _quad_vjp(b_g, p_x0, o_tt, s_xt, m_t, scale, g: tl.constexpr, F: tl.constexpr, BK: tl.constexpr):
    """Group g's part of ``(G + G^T) x' / sqrt(2)`` for g = the [BT, BK*BK/4] block of feature gradients."""
    o_a, o_b, _, m_g = _group(g, F, BK)
    o_k = tl.arange(0, BK)
    b_xa = _gather(p_x0, o_tt, s_xt, m_t, o_a, m_g).to(tl.float32) * scale
    b_xb = _gather(p_x0, o_tt, s_xt, m_t, o_b, m_g).to(tl.float32) * scale
    b_pa = (o_a[:, None] == o_k[None, :]).to(tl.float32)
    b_pb = (o_b[:, None] == o_k[None, :]).to(tl.float32)
    return (tl.dot(b_g * b_xb, b_pa) + tl.dot(b_g * b_xa, b_pb)) * RSQRT2


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
    m_c = (o_t[:, None] >= o_t[None, :])
    c2 = scale * scale * RSQRT2

    # the forward state (the constant feature has no gradient w.r.t. q: h0, z0 stay unused)
    if USE_H0:
        b_h0, b_h1, b_h2a, b_h2b, b_h2c, b_h2d, b_z0, b_z1, b_Z2 = _load_state(
            h0s + i_st * D * DV, h0z + i_st * D, o_v, m_v, F, DV, BK)
    else:
        b_h0, b_h1, b_h2a, b_h2b, b_h2c, b_h2d, b_z0, b_z1, b_Z2 = _zero_state(BV, BK)

    p_q0 = q + i_b * s_qb + i_h * s_qh
    p_k0 = k + i_b * s_kb + i_h * s_kh
    p_v0 = v + i_b * s_vb + i_h * s_vh
    p_y0 = dy + i_b * s_yb + i_h * s_yh
    p_g0 = dq + i_v.to(tl.int64) * s_gn + i_b * s_gb + i_h * s_gh
    for t0 in range(bos, eos, BT):
        o_tt = t0 + o_t
        m_t = o_tt < eos
        b_q = _gather(p_q0, o_tt, s_qt, m_t, o_k, m_k)
        b_k = _gather(p_k0, o_tt, s_kt, m_t, o_k, m_k)
        b_v = _gather(p_v0, o_tt, s_vt, m_t, o_v, m_v)
        b_dy = _gather(p_y0, o_tt, s_yt, m_t, o_v, m_v)
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
        # inter-chunk: d/dq' of phi(q') . (S do + z dd)
        b_dq += tl.dot(b_do, tl.trans(b_h1))
        b_dq += b_ddv[:, None] * (b_z1[None, :] + _dot_ieee(b_qs, b_Z2 + tl.trans(b_Z2)) * RSQRT2)
        b_dq += _quad_vjp(_mm(b_do, tl.trans(b_h2a), b_v, HI), p_q0, o_tt, s_qt, m_t, scale, 0, F, BK)
        b_dq += _quad_vjp(_mm(b_do, tl.trans(b_h2b), b_v, HI), p_q0, o_tt, s_qt, m_t, scale, 1, F, BK)
        b_dq += _quad_vjp(_mm(b_do, tl.trans(b_h2c), b_v, HI), p_q0, o_tt, s_qt, m_t, scale, 2, F, BK)
        b_dq += _quad_vjp(_mm(b_do, tl.trans(b_h2d), b_v, HI), p_q0, o_tt, s_qt, m_t, scale, 3, F, BK)
        tl.store(p_g0 + o_tt[:, None] * s_gt + o_k[None, :], b_dq * scale, mask=m_t[:, None] & m_k[None, :])
        # the forward state, advanced past this chunk
        b_h1 += tl.dot(tl.trans(b_ks), b_v.to(tl.float32))
        b_h2a += _mm(tl.trans(_qq(p_k0, o_tt, s_kt, m_t, 0, F, BK)), b_v, b_v, HI) * c2
        b_h2b += _mm(tl.trans(_qq(p_k0, o_tt, s_kt, m_t, 1, F, BK)), b_v, b_v, HI) * c2
        b_h2c += _mm(tl.trans(_qq(p_k0, o_tt, s_kt, m_t, 2, F, BK)), b_v, b_v, HI) * c2
        b_h2d += _mm(tl.trans(_qq(p_k0, o_tt, s_kt, m_t, 3, F, BK)), b_v, b_v, HI) * c2
        b_z1 += tl.sum(b_ks, 0)
        b_Z2 += _dot_ieee(tl.trans(b_ks), b_ks) * RSQRT2


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
    m_c = (o_t[:, None] >= o_t[None, :])
    c2 = scale * scale * RSQRT2

    # gradient of the state after the current chunk (later chunks' queries + the final state's gradient)
    if USE_DHT:
        b_h0, b_h1, b_h2a, b_h2b, b_h2c, b_h2d, b_z0, b_z1, b_Z2 = _load_state(
            dhts + i_st * D * DV, dhtz + i_st * D, o_v, m_v, F, DV, BK)
    else:
        b_h0, b_h1, b_h2a, b_h2b, b_h2c, b_h2d, b_z0, b_z1, b_Z2 = _zero_state(BV, BK)

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
        b_q = _gather(p_q0, o_tt, s_qt, m_t, o_k, m_k)
        b_k = _gather(p_k0, o_tt, s_kt, m_t, o_k, m_k)
        b_v = _gather(p_v0, o_tt, s_vt, m_t, o_v, m_v)
        b_dy = _gather(p_y0, o_tt, s_yt, m_t, o_v, m_v)
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
        # inter-chunk: this chunk's keys reach every later query through the state
        b_r = _mm(_qq(p_k0, o_tt, s_kt, m_t, 0, F, BK), b_h2a, b_v, HI)
        b_r += _mm(_qq(p_k0, o_tt, s_kt, m_t, 1, F, BK), b_h2b, b_v, HI)
        b_r += _mm(_qq(p_k0, o_tt, s_kt, m_t, 2, F, BK), b_h2c, b_v, HI)
        b_r += _mm(_qq(p_k0, o_tt, s_kt, m_t, 3, F, BK), b_h2d, b_v, HI)
        b_dv += b_h0[None, :] + tl.dot(b_ks, b_h1) + b_r * c2
        b_dk += tl.dot(b_v.to(tl.float32), tl.trans(b_h1))
        b_dk += w0 * (b_z1[None, :] + _dot_ieee(b_ks, b_Z2 + tl.trans(b_Z2)) * RSQRT2)
        b_dk += _quad_vjp(_mm(b_v, tl.trans(b_h2a), b_v, HI), p_k0, o_tt, s_kt, m_t, scale, 0, F, BK)
        b_dk += _quad_vjp(_mm(b_v, tl.trans(b_h2b), b_v, HI), p_k0, o_tt, s_kt, m_t, scale, 1, F, BK)
        b_dk += _quad_vjp(_mm(b_v, tl.trans(b_h2c), b_v, HI), p_k0, o_tt, s_kt, m_t, scale, 2, F, BK)
        b_dk += _quad_vjp(_mm(b_v, tl.trans(b_h2d), b_v, HI), p_k0, o_tt, s_kt, m_t, scale, 3, F, BK)
        tl.store(p_g0 + o_tt[:, None] * s_gt + o_k[None, :], b_dk * scale, mask=m_t[:, None] & m_k[None, :])
        tl.store(p_e0 + o_tt[:, None] * s_et + o_v[None, :], b_dv.to(dv.dtype.element_ty),
                 mask=m_t[:, None] & m_v[None, :])
        # add this chunk's queries to the state gradient
        b_h0 += tl.sum(b_do, 0)
        b_h1 += tl.dot(tl.trans(b_qs), b_do)
        b_h2a += _mm(tl.trans(_qq(p_q0, o_tt, s_qt, m_t, 0, F, BK)), b_do, b_v, HI) * c2
        b_h2b += _mm(tl.trans(_qq(p_q0, o_tt, s_qt, m_t, 1, F, BK)), b_do, b_v, HI) * c2
        b_h2c += _mm(tl.trans(_qq(p_q0, o_tt, s_qt, m_t, 2, F, BK)), b_do, b_v, HI) * c2
        b_h2d += _mm(tl.trans(_qq(p_q0, o_tt, s_qt, m_t, 3, F, BK)), b_do, b_v, HI) * c2
        b_z0 += tl.sum(b_dd, 0)
        b_z1 += tl.sum(b_qs * b_dd[:, None], 0)
        b_Z2 += _dot_ieee(tl.trans(b_qs * b_dd[:, None]), b_qs) * RSQRT2

    if STORE_DH0:
        _store_state(dh0s + i_st * D * DV, dh0z + i_st * D, b_h0, b_h1, b_h2a, b_h2b, b_h2c, b_h2d, b_z0, b_z1,
                     b_Z2, i_v, o_v, m_v, F, DV, BK)
