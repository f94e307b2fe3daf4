"""Triton forward kernels of Taylor linear attention (fused chunked form).

Notation (see README.md): ``x' = x * f^(-1/4)`` for q and k, so that ``phi(x) = [1, x', x' (x) x' / sqrt(2)]``
(the 273-feature map of reference.py) and ``K(q, k) = 1 + s + s^2/2`` with ``s = q'.k'``. The state of one
(sequence, head) is kept in exactly the external layout, ``S = sum phi(k) v^T`` ``[D, d_v]`` and
``z = sum phi(k)`` ``[D]``, split on chip into its constant row (``h0``), linear rows (``h1`` ``[BK, BV]``) and
quadratic rows in four groups (``h2a..h2d``, ``[BK*BK/4, BV]`` each; flat row ``a*BK + b`` holds feature
``1 + F + a*F + b``). The quadratic features ``x (x) x`` of a chunk are formed group by group from two gathered
loads of the chunk's rows (L1 hits): one ``[BT, BK*BK]`` tile or a 3-D broadcast + reshape made ptxas spill.

Programs are ``(i_v, i_n, i_h)``: a block of BV value columns, a work item (a whole sequence, one segment of
a sequence, or one document of a varlen batch) and a head. Each program walks its tokens chunk by chunk,
reading the running state for the inter-chunk part and the masked ``1 + s + s^2/2`` matrix for the
intra-chunk part, then adding the chunk to the state. Nothing of size ``D`` is written to HBM except the
states asked for (final state, or per-segment states when a sequence is split across programs).
"""
from __future__ import annotations

import triton
import triton.language as tl

RSQRT2 = tl.constexpr(0.7071067811865476)


@triton.jit
def _dot_ieee(b_a, b_b):
    """Small fp32 products (normaliser terms, [BT, BK] x [BK, BK] and the like) in full fp32: the normaliser
    divides every output, so it gets no tf32 rounding."""
    return tl.dot(b_a, b_b, input_precision="ieee")


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
def _group(g: tl.constexpr, F: tl.constexpr, BK: tl.constexpr):
    """Quadratic-feature group g (of 4): factor indices a, b of its flat features, state rows and mask."""
    G: tl.constexpr = BK * BK // 4
    o_f = g * G + tl.arange(0, G)
    o_a = o_f // BK
    o_b = o_f % BK
    return o_a, o_b, 1 + F + o_a * F + o_b, (o_a < F) & (o_b < F)


@triton.jit
def _gather(p_x0, o_tt, s_xt, m_t, o_c, m_c):
    """Columns o_c of a chunk's rows, [BT, len(o_c)] in the input dtype."""
    return tl.load(p_x0 + o_tt[:, None] * s_xt + o_c[None, :], mask=m_t[:, None] & m_c[None, :], other=0.)


@triton.jit
def _qq(p_x0, o_tt, s_xt, m_t, g: tl.constexpr, F: tl.constexpr, BK: tl.constexpr):
    """Raw quadratic features ``x_a x_b`` of group g, ``[BT, BK*BK/4]`` in the input dtype."""
    o_a, o_b, _, m_g = _group(g, F, BK)
    return _gather(p_x0, o_tt, s_xt, m_t, o_a, m_g) * _gather(p_x0, o_tt, s_xt, m_t, o_b, m_g)


@triton.jit
def _load_h2(p_s, g: tl.constexpr, o_v, m_v, F: tl.constexpr, DV: tl.constexpr, BK: tl.constexpr):
    _, _, r_g, m_g = _group(g, F, BK)
    return tl.load(p_s + r_g[:, None] * DV + o_v[None, :], mask=m_g[:, None] & m_v[None, :], other=0.)


@triton.jit
def _store_h2(p_s, b_h, g: tl.constexpr, o_v, m_v, F: tl.constexpr, DV: tl.constexpr, BK: tl.constexpr):
    _, _, r_g, m_g = _group(g, F, BK)
    tl.store(p_s + r_g[:, None] * DV + o_v[None, :], b_h, mask=m_g[:, None] & m_v[None, :])


@triton.jit
def _load_state(p_s, p_z, o_v, m_v, F: tl.constexpr, DV: tl.constexpr, BK: tl.constexpr):
    """(h0 [BV], h1 [BK, BV], h2a..h2d [BK*BK/4, BV], z0 [1], z1 [BK], Z2 [BK, BK]) of one state, fp32."""
    o_k = tl.arange(0, BK)
    m_k = o_k < F
    b_h0 = tl.load(p_s + o_v, mask=m_v, other=0.)
    b_h1 = tl.load(p_s + (1 + o_k)[:, None] * DV + o_v[None, :], mask=m_k[:, None] & m_v[None, :], other=0.)
    b_z0 = tl.load(p_z + tl.arange(0, 1))
    b_z1 = tl.load(p_z + 1 + o_k, mask=m_k, other=0.)
    b_Z2 = tl.load(p_z + 1 + F + o_k[:, None] * F + o_k[None, :], mask=m_k[:, None] & m_k[None, :], other=0.)
    return (b_h0, b_h1, _load_h2(p_s, 0, o_v, m_v, F, DV, BK), _load_h2(p_s, 1, o_v, m_v, F, DV, BK),
            _load_h2(p_s, 2, o_v, m_v, F, DV, BK), _load_h2(p_s, 3, o_v, m_v, F, DV, BK), b_z0, b_z1, b_Z2)


@triton.jit
def _store_state(p_s, p_z, b_h0, b_h1, b_h2a, b_h2b, b_h2c, b_h2d, b_z0, b_z1, b_Z2, i_v, o_v, m_v,
                 F: tl.constexpr, DV: tl.constexpr, BK: tl.constexpr):
    """Store a state; z only from value block 0."""
    o_k = tl.arange(0, BK)
    m_k = o_k < F
    o_1 = tl.arange(0, 1)
    tl.store(p_s + o_v, b_h0, mask=m_v)
    tl.store(p_s + (1 + o_k)[:, None] * DV + o_v[None, :], b_h1, mask=m_k[:, None] & m_v[None, :])
    _store_h2(p_s, b_h2a, 0, o_v, m_v, F, DV, BK)
    _store_h2(p_s, b_h2b, 1, o_v, m_v, F, DV, BK)
    _store_h2(p_s, b_h2c, 2, o_v, m_v, F, DV, BK)
    _store_h2(p_s, b_h2d, 3, o_v, m_v, F, DV, BK)
    tl.store(p_z + o_1, b_z0, mask=(o_1 < 1) & (i_v == 0))
    tl.store(p_z + 1 + o_k, b_z1, mask=m_k & (i_v == 0))
    tl.store(p_z + 1 + F + o_k[:, None] * F + o_k[None, :], b_Z2, mask=m_k[:, None] & m_k[None, :] & (i_v == 0))


@triton.jit
def _zero_state(BV: tl.constexpr, BK: tl.constexpr):
    G: tl.constexpr = BK * BK // 4
    return (tl.zeros([BV], dtype=tl.float32), tl.zeros([BK, BV], dtype=tl.float32),
            tl.zeros([G, BV], dtype=tl.float32), tl.zeros([G, BV], dtype=tl.float32),
            tl.zeros([G, BV], dtype=tl.float32), tl.zeros([G, BV], dtype=tl.float32),
            tl.zeros([1], dtype=tl.float32), tl.zeros([BK], dtype=tl.float32), tl.zeros([BK, BK], dtype=tl.float32))


@triton.jit
def taylor_fwd_kernel(
    q, k, v, o, den, h0s, h0z, hts, htz, cu_seqlens,
    s_qb, s_qt, s_qh, s_kb, s_kt, s_kh, s_vb, s_vt, s_vh, s_ob, s_ot, s_oh,
    T, H, NS, L_SEG, scale, eps,
    F: tl.constexpr, DV: tl.constexpr, BK: tl.constexpr, BT: tl.constexpr, BV: tl.constexpr,
    USE_H0: tl.constexpr, STORE_HT: tl.constexpr, IS_VARLEN: tl.constexpr,
    HI_INTRA: tl.constexpr, HI_READ: tl.constexpr,
):
    D: tl.constexpr = 1 + F + F * F
    i_v, i_n, i_h = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    i_b, bos, eos = _work_item(i_n, cu_seqlens, T, NS, L_SEG, IS_VARLEN)
    i_st = i_n.to(tl.int64) * H + i_h

    o_t = tl.arange(0, BT)
    o_k = tl.arange(0, BK)
    m_k = o_k < F
    o_v = i_v * BV + tl.arange(0, BV)
    m_v = o_v < DV
    m_c = (o_t[:, None] >= o_t[None, :])
    c2 = scale * scale * RSQRT2  # (x (x) x) * c2 = x' (x) x' / sqrt(2)

    if USE_H0:
        b_h0, b_h1, b_h2a, b_h2b, b_h2c, b_h2d, b_z0, b_z1, b_Z2 = _load_state(
            h0s + i_st * D * DV, h0z + i_st * D, o_v, m_v, F, DV, BK)
    else:
        b_h0, b_h1, b_h2a, b_h2b, b_h2c, b_h2d, b_z0, b_z1, b_Z2 = _zero_state(BV, BK)

    p_q0 = q + i_b * s_qb + i_h * s_qh
    p_k0 = k + i_b * s_kb + i_h * s_kh
    p_v0 = v + i_b * s_vb + i_h * s_vh
    p_o0 = o + i_b * s_ob + i_h * s_oh
    for t0 in range(bos, eos, BT):
        o_tt = t0 + o_t
        m_t = o_tt < eos
        b_q = _gather(p_q0, o_tt, s_qt, m_t, o_k, m_k)
        b_k = _gather(p_k0, o_tt, s_kt, m_t, o_k, m_k)
        b_v = _gather(p_v0, o_tt, s_vt, m_t, o_v, m_v)
        b_qs = b_q.to(tl.float32) * scale
        b_ks = b_k.to(tl.float32) * scale
        # intra-chunk: masked 1 + s + s^2/2 (s from the raw inputs: exact products, one fp32 rescale)
        b_s = tl.dot(b_q, tl.trans(b_k)) * (scale * scale)
        b_A = tl.where(m_c & m_t[None, :], 1. + b_s + 0.5 * b_s * b_s, 0.)
        b_num = _mm(b_A, b_v, b_v, HI_INTRA)
        b_den = tl.sum(b_A, 1)
        # inter-chunk: phi(q') . state of the earlier chunks
        b_r = _mm(_qq(p_q0, o_tt, s_qt, m_t, 0, F, BK), b_h2a, b_v, HI_READ)
        b_r += _mm(_qq(p_q0, o_tt, s_qt, m_t, 1, F, BK), b_h2b, b_v, HI_READ)
        b_r += _mm(_qq(p_q0, o_tt, s_qt, m_t, 2, F, BK), b_h2c, b_v, HI_READ)
        b_r += _mm(_qq(p_q0, o_tt, s_qt, m_t, 3, F, BK), b_h2d, b_v, HI_READ)
        b_num += b_h0[None, :] + tl.dot(b_qs, b_h1) + b_r * c2
        b_den += b_z0 + tl.sum(b_qs * b_z1[None, :], 1) + tl.sum(_dot_ieee(b_qs, b_Z2) * b_qs, 1) * RSQRT2
        b_o = b_num / (b_den + eps)[:, None]
        tl.store(p_o0 + o_tt[:, None] * s_ot + o_v[None, :], b_o.to(o.dtype.element_ty),
                 mask=m_t[:, None] & m_v[None, :])
        tl.store(den + (i_b * T + o_tt) * H + i_h, b_den, mask=m_t & (i_v == 0))
        # add the chunk to the state (update operands in the input dtype, fp32 accumulation)
        b_h0 += tl.sum(b_v.to(tl.float32), 0)
        b_h1 += tl.dot(tl.trans(b_ks), b_v.to(tl.float32))
        b_h2a += tl.dot(tl.trans(_qq(p_k0, o_tt, s_kt, m_t, 0, F, BK)), b_v) * c2
        b_h2b += tl.dot(tl.trans(_qq(p_k0, o_tt, s_kt, m_t, 1, F, BK)), b_v) * c2
        b_h2c += tl.dot(tl.trans(_qq(p_k0, o_tt, s_kt, m_t, 2, F, BK)), b_v) * c2
        b_h2d += tl.dot(tl.trans(_qq(p_k0, o_tt, s_kt, m_t, 3, F, BK)), b_v) * c2
        b_z0 += tl.sum(m_t.to(tl.float32), 0)
        b_z1 += tl.sum(b_ks, 0)
        b_Z2 += _dot_ieee(tl.trans(b_ks), b_ks) * RSQRT2

    if STORE_HT:
        _store_state(hts + i_st * D * DV, htz + i_st * D, b_h0, b_h1, b_h2a, b_h2b, b_h2c, b_h2d, b_z0, b_z1,
                     b_Z2, i_v, o_v, m_v, F, DV, BK)


@triton.jit
def taylor_state_kernel(
    x, w, wden, col, hs, hz,
    s_xb, s_xt, s_xh, s_wb, s_wt, s_wh,
    T, H, NS, L_SEG, scale,
    F: tl.constexpr, DV: tl.constexpr, BK: tl.constexpr, BT: tl.constexpr, BV: tl.constexpr,
    W_DEN: tl.constexpr, HAS_COL: tl.constexpr,
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
    c2 = scale * scale * RSQRT2

    b_h0, b_h1, b_h2a, b_h2b, b_h2c, b_h2d, b_z0, b_z1, b_Z2 = _zero_state(BV, BK)
    p_x0 = x + i_b * s_xb + i_h * s_xh
    p_w0 = w + i_b * s_wb + i_h * s_wh
    for t0 in range(bos, eos, BT):
        o_tt = t0 + o_t
        m_t = o_tt < eos
        b_x = _gather(p_x0, o_tt, s_xt, m_t, o_k, m_k)
        b_w = _gather(p_w0, o_tt, s_wt, m_t, o_v, m_v)
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
        b_wd = b_wf.to(b_w.dtype)
        b_h0 += tl.sum(b_wf, 0)
        b_h1 += tl.dot(tl.trans(b_xs), b_wf)
        b_h2a += tl.dot(tl.trans(_qq(p_x0, o_tt, s_xt, m_t, 0, F, BK)), b_wd) * c2
        b_h2b += tl.dot(tl.trans(_qq(p_x0, o_tt, s_xt, m_t, 1, F, BK)), b_wd) * c2
        b_h2c += tl.dot(tl.trans(_qq(p_x0, o_tt, s_xt, m_t, 2, F, BK)), b_wd) * c2
        b_h2d += tl.dot(tl.trans(_qq(p_x0, o_tt, s_xt, m_t, 3, F, BK)), b_wd) * c2
        b_z0 += tl.sum(b_c, 0)
        b_z1 += tl.sum(b_xs * b_c[:, None], 0)
        b_Z2 += _dot_ieee(tl.trans(b_xs * b_c[:, None]), b_xs) * RSQRT2

    _store_state(hs + i_st * D * DV, hz + i_st * D, b_h0, b_h1, b_h2a, b_h2b, b_h2c, b_h2d, b_z0, b_z1, b_Z2,
                 i_v, o_v, m_v, F, DV, BK)
