"""Triton forward kernels of Taylor linear attention (fused chunked form).

Notation (see README.md): ``x' = x * f^(-1/4)`` for q and k, so that ``phi(x) = [1, x', x' (x) x' / sqrt(2)]``
(the 273-feature map of reference.py) and ``K(q, k) = 1 + s + s^2/2`` with ``s = q'.k'``. The state of one
(sequence, head) is kept in exactly the external layout, ``S = sum phi(k) v^T`` ``[D, d_v]`` and
``z = sum phi(k)`` ``[D]``, split on chip into its constant row (``h0``), linear rows (``h1`` ``[BK, BV]``) and
quadratic rows (``h2`` ``[BK*BK, BV]``, row ``a*BK + b`` holds feature ``1 + F + a*F + b``).

Programs are ``(i_v, i_n, i_h)``: a block of BV value columns, a work item (a whole sequence, one segment of
a sequence, or one document of a varlen batch) and a head. Each program walks its tokens chunk by chunk,
reading the running state for the inter-chunk part and the masked ``1 + s + s^2/2`` matrix for the
intra-chunk part, then adding the chunk to the state. Nothing of size ``D`` is written to HBM except the
states asked for (final state, or per-segment states when a sequence is split across programs).
"""
from __future__ import annotations

import triton
import triton.language as tl

RSQRT2 = 0.7071067811865476


@triton.jit
def _quad(b_x, BT: tl.constexpr, BK: tl.constexpr):
    """``x (x) x / sqrt(2)`` per row, flattened row-major: ``[BT, BK]`` -> ``[BT, BK*BK]`` (fp32)."""
    return tl.reshape(b_x[:, :, None] * b_x[:, None, :], (BT, BK * BK)) * RSQRT2


@triton.jit
def _quad_vjp(b_g, b_x, BT: tl.constexpr, BK: tl.constexpr):
    """Gradient of ``g . (x (x) x / sqrt(2))`` w.r.t. x, per row: ``(G + G^T) x / sqrt(2)``, G = g as [BK, BK].

    Both transposes are kept (not ``2 G x``): a user-supplied state need not be symmetric in (a, b)."""
    b_g3 = tl.reshape(b_g, (BT, BK, BK))
    return (tl.sum(b_g3 * b_x[:, None, :], 2) + tl.sum(b_g3 * b_x[:, :, None], 1)) * RSQRT2


@triton.jit
def _mm(b_a, b_b, b_like, HI: tl.constexpr):
    """Matrix product with fp32 accumulation: operands in fp32 (tf32 on tensor cores) when HI, else cast to the
    dtype of ``b_like`` (the input dtype, bf16/fp16: full-rate tensor cores)."""
    if HI:
        return tl.dot(b_a.to(tl.float32), b_b.to(tl.float32))
    else:
        return tl.dot(b_a.to(b_like.dtype), b_b.to(b_like.dtype))


@triton.jit
def _work_item(i_n, cu_seqlens, T, NS, L_SEG, IS_VARLEN: tl.constexpr):
    """Batch row and token range [bos, eos) of work item i_n (a document, or segment i_n % NS of row i_n // NS)."""
    if IS_VARLEN:
        i_b = i_n.to(tl.int64) * 0
        bos = tl.load(cu_seqlens + i_n).to(tl.int64)
        eos = tl.load(cu_seqlens + i_n + 1).to(tl.int64)
    else:
        i_b = i_n.to(tl.int64) // NS
        bos = (i_n.to(tl.int64) % NS) * L_SEG
        eos = tl.minimum(bos + L_SEG, T)
    return i_b, bos, eos


@triton.jit
def _state_rows(F: tl.constexpr, BK: tl.constexpr):
    """Row indices (into the D = 1 + F + F^2 feature rows) of the linear and quadratic blocks, with masks."""
    o_k = tl.arange(0, BK)
    o_f = tl.arange(0, BK * BK)
    o_fa = o_f // BK
    o_fb = o_f % BK
    return 1 + o_k, o_k < F, 1 + F + o_fa * F + o_fb, (o_fa < F) & (o_fb < F)


@triton.jit
def taylor_fwd_kernel(
    q, k, v, o, den, h0s, h0z, hts, htz, cu_seqlens,
    s_qb, s_qt, s_qh, s_kb, s_kt, s_kh, s_vb, s_vt, s_vh, s_ob, s_ot, s_oh,
    T, H, NS, L_SEG, scale, eps,
    F: tl.constexpr, DV: tl.constexpr, BK: tl.constexpr, BT: tl.constexpr, BV: tl.constexpr,
    USE_H0: tl.constexpr, STORE_HT: tl.constexpr, IS_VARLEN: tl.constexpr,
    HI_READ: tl.constexpr, HI_UPD: tl.constexpr,
):
    D: tl.constexpr = 1 + F + F * F
    i_v, i_n, i_h = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    i_b, bos, eos = _work_item(i_n, cu_seqlens, T, NS, L_SEG, IS_VARLEN)
    i_st = i_n.to(tl.int64) * H + i_h

    o_t = tl.arange(0, BT)
    o_k = tl.arange(0, BK)
    o_v = i_v * BV + tl.arange(0, BV)
    m_v = o_v < DV
    r_1, m_1, r_2, m_2 = _state_rows(F, BK)
    o_1 = tl.arange(0, 1)
    m_c = (o_t[:, None] >= o_t[None, :])

    b_h0 = tl.zeros([BV], dtype=tl.float32)
    b_h1 = tl.zeros([BK, BV], dtype=tl.float32)
    b_h2 = tl.zeros([BK * BK, BV], dtype=tl.float32)
    b_z0 = tl.zeros([1], dtype=tl.float32)
    b_z1 = tl.zeros([BK], dtype=tl.float32)
    b_z2 = tl.zeros([BK * BK], dtype=tl.float32)
    if USE_H0:
        p_s = h0s + i_st * D * DV
        p_z = h0z + i_st * D
        b_h0 += tl.load(p_s + o_v, mask=m_v, other=0.)
        b_h1 += tl.load(p_s + r_1[:, None] * DV + o_v[None, :], mask=m_1[:, None] & m_v[None, :], other=0.)
        b_h2 += tl.load(p_s + r_2[:, None] * DV + o_v[None, :], mask=m_2[:, None] & m_v[None, :], other=0.)
        b_z0 += tl.load(p_z + o_1)
        b_z1 += tl.load(p_z + r_1, mask=m_1, other=0.)
        b_z2 += tl.load(p_z + r_2, mask=m_2, other=0.)

    p_q0 = q + i_b * s_qb + i_h * s_qh
    p_k0 = k + i_b * s_kb + i_h * s_kh
    p_v0 = v + i_b * s_vb + i_h * s_vh
    p_o0 = o + i_b * s_ob + i_h * s_oh
    m_k = o_k < F
    for t0 in range(bos, eos, BT):
        o_tt = t0 + o_t
        m_t = o_tt < eos
        b_q = tl.load(p_q0 + o_tt[:, None] * s_qt + o_k[None, :], mask=m_t[:, None] & m_k[None, :], other=0.)
        b_k = tl.load(p_k0 + o_tt[:, None] * s_kt + o_k[None, :], mask=m_t[:, None] & m_k[None, :], other=0.)
        b_v = tl.load(p_v0 + o_tt[:, None] * s_vt + o_v[None, :], mask=m_t[:, None] & m_v[None, :], other=0.)
        # intra-chunk: masked 1 + s + s^2/2 (s from the raw inputs: exact products, one fp32 rescale)
        b_s = tl.dot(b_q, tl.trans(b_k)) * (scale * scale)
        b_A = tl.where(m_c & m_t[None, :], 1. + b_s + 0.5 * b_s * b_s, 0.)
        b_qs = b_q.to(tl.float32) * scale
        b_qq = _quad(b_qs, BT, BK)
        b_num = _mm(b_A, b_v, b_v, HI_READ)
        # inter-chunk: phi(q') . state of the earlier chunks
        b_num += b_h0[None, :] + tl.dot(b_qs, b_h1) + _mm(b_qq, b_h2, b_v, HI_READ)
        b_den = tl.sum(b_A, 1) + b_z0 + tl.sum(b_qs * b_z1[None, :], 1) + tl.sum(b_qq * b_z2[None, :], 1)
        b_o = b_num / (b_den + eps)[:, None]
        tl.store(p_o0 + o_tt[:, None] * s_ot + o_v[None, :], b_o.to(o.dtype.element_ty),
                 mask=m_t[:, None] & m_v[None, :])
        tl.store(den + (i_b * T + o_tt) * H + i_h, b_den, mask=m_t & (i_v == 0))
        # add the chunk to the state
        b_ks = b_k.to(tl.float32) * scale
        b_kk = _quad(b_ks, BT, BK)
        b_h0 += tl.sum(b_v.to(tl.float32), 0)
        b_h1 += tl.dot(tl.trans(b_ks), b_v.to(tl.float32))
        b_h2 += _mm(tl.trans(b_kk), b_v, b_v, HI_UPD)
        b_z0 += tl.sum(m_t.to(tl.float32), 0)
        b_z1 += tl.sum(b_ks, 0)
        b_z2 += tl.sum(b_kk, 0)

    if STORE_HT:
        p_s = hts + i_st * D * DV
        p_z = htz + i_st * D
        tl.store(p_s + o_v, b_h0, mask=m_v)
        tl.store(p_s + r_1[:, None] * DV + o_v[None, :], b_h1, mask=m_1[:, None] & m_v[None, :])
        tl.store(p_s + r_2[:, None] * DV + o_v[None, :], b_h2, mask=m_2[:, None] & m_v[None, :])
        tl.store(p_z + o_1, b_z0, mask=(o_1 < 1) & (i_v == 0))
        tl.store(p_z + r_1, b_z1, mask=m_1 & (i_v == 0))
        tl.store(p_z + r_2, b_z2, mask=m_2 & (i_v == 0))


@triton.jit
def taylor_state_kernel(
    x, w, wden, col, hs, hz,
    s_xb, s_xt, s_xh, s_wb, s_wt, s_wh,
    T, H, NS, L_SEG, scale,
    F: tl.constexpr, DV: tl.constexpr, BK: tl.constexpr, BT: tl.constexpr, BV: tl.constexpr,
    W_DEN: tl.constexpr, HAS_COL: tl.constexpr, HI_UPD: tl.constexpr,
):
    """Per-segment state ``sum_t phi(x'_t) [w_t | c_t]^T`` (``w_t / den_t`` when W_DEN; ``c_t`` = 1 or col).

    Forward: (x, w, c) = (k, v, 1) gives each segment's contribution to S, z. Backward: (q, dy/den, dd) gives
    each segment's contribution to the state gradient (dS, dz)."""
    D: tl.constexpr = 1 + F + F * F
    i_v, i_n, i_h = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    i_b, bos, eos = _work_item(i_n, col, T, NS, L_SEG, False)
    i_st = i_n.to(tl.int64) * H + i_h

    o_t = tl.arange(0, BT)
    o_k = tl.arange(0, BK)
    m_k = o_k < F
    o_v = i_v * BV + tl.arange(0, BV)
    m_v = o_v < DV
    r_1, m_1, r_2, m_2 = _state_rows(F, BK)
    o_1 = tl.arange(0, 1)

    b_h0 = tl.zeros([BV], dtype=tl.float32)
    b_h1 = tl.zeros([BK, BV], dtype=tl.float32)
    b_h2 = tl.zeros([BK * BK, BV], dtype=tl.float32)
    b_z0 = tl.zeros([1], dtype=tl.float32)
    b_z1 = tl.zeros([BK], dtype=tl.float32)
    b_z2 = tl.zeros([BK * BK], dtype=tl.float32)
    p_x0 = x + i_b * s_xb + i_h * s_xh
    p_w0 = w + i_b * s_wb + i_h * s_wh
    for t0 in range(bos, eos, BT):
        o_tt = t0 + o_t
        m_t = o_tt < eos
        b_x = tl.load(p_x0 + o_tt[:, None] * s_xt + o_k[None, :], mask=m_t[:, None] & m_k[None, :], other=0.)
        b_w = tl.load(p_w0 + o_tt[:, None] * s_wt + o_v[None, :], mask=m_t[:, None] & m_v[None, :], other=0.)
        if W_DEN:
            b_d = tl.load(wden + (i_b * T + o_tt) * H + i_h, mask=m_t, other=1.)
            b_wf = b_w.to(tl.float32) / b_d[:, None]
        else:
            b_wf = b_w.to(tl.float32)
        if HAS_COL:
            b_c = tl.load(col + (i_b * T + o_tt) * H + i_h, mask=m_t, other=0.)
        else:
            b_c = m_t.to(tl.float32)
        b_xs = b_x.to(tl.float32) * scale
        b_xx = _quad(b_xs, BT, BK)
        b_h0 += tl.sum(b_wf, 0)
        b_h1 += tl.dot(tl.trans(b_xs), b_wf)
        b_h2 += _mm(tl.trans(b_xx), b_wf, b_w, HI_UPD)
        b_z0 += tl.sum(b_c, 0)
        b_z1 += tl.sum(b_xs * b_c[:, None], 0)
        b_z2 += tl.sum(b_xx * b_c[:, None], 0)

    p_s = hs + i_st * D * DV
    p_z = hz + i_st * D
    tl.store(p_s + o_v, b_h0, mask=m_v)
    tl.store(p_s + r_1[:, None] * DV + o_v[None, :], b_h1, mask=m_1[:, None] & m_v[None, :])
    tl.store(p_s + r_2[:, None] * DV + o_v[None, :], b_h2, mask=m_2[:, None] & m_v[None, :])
    tl.store(p_z + o_1, b_z0, mask=(o_1 < 1) & (i_v == 0))
    tl.store(p_z + r_1, b_z1, mask=m_1 & (i_v == 0))
    tl.store(p_z + r_2, b_z2, mask=m_2 & (i_v == 0))
