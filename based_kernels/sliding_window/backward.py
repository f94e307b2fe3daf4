"""Triton backward of causal sliding-window attention: two deterministic kernels, no atomics.

``P = exp2(S * scale * log2 e - lse)``, ``dP = dO V^T``, ``dS = P * (dP - delta)`` with ``delta = rowsum(dO * O)``.

- ``swa_bwd_dq_kernel``: one program per (query block, batch x head) walks the window's keys (as the forward)
  and writes dQ; it also computes ``delta`` for its rows and stores it for the second kernel.
- ``swa_bwd_dkdv_kernel``: one program per (key block, batch x kv head) walks the queries that see the block
  (``j ... j + W``) for each of the G query heads of the group in a fixed order and writes dK, dV (and the
  kv_prefix gradients for rows ``j < 0``). Summing GQA groups inside one program keeps it deterministic.
P is rebuilt twice (once per kernel): the price of determinism, small at W <= 256. Each kernel runs plain, then
``CONFINE`` (``_common.launch_confined``; README, "Masked pairs").
"""
from __future__ import annotations

import triton
import triton.language as tl

from .._common import configs, tune_bench
from .._jit_common import finite_rows, flag_non_finite, grid_program
from .forward import load_kv_rows, visible_mask


@triton.autotune(
    configs=configs(
        # (BM, BN, warps, stages); the first is the launch without tuning (README "Tiles")
        [triton.Config({"BM": bm, "BN": bn}, num_warps=w, num_stages=s)
         for bm, bn, w, s in [(64, 32, 4, 3), (64, 32, 4, 2), (64, 64, 4, 3), (64, 64, 4, 2)]],
        triton.Config({"BM": 16, "BN": 32}),
    ),
    do_bench=tune_bench, key=["BLOCK_D"],
)
@triton.jit
def swa_bwd_dq_kernel(
    q, k, v, kp, vp, o, do, lse, delta, dq, doc, bad,
    s_qb, s_qt, s_qh, s_kb, s_kt, s_kh, s_vb, s_vt, s_vh,
    s_kpb, s_kpt, s_kph, s_vpb, s_vpt, s_vph, s_ob, s_ot, s_oh, s_dob, s_dot, s_doh, s_dqb, s_dqt, s_dqh,
    T, P, H, scale,
    D: tl.constexpr, W: tl.constexpr, G: tl.constexpr, BLOCK_D: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr,
    HAS_PREFIX: tl.constexpr, IS_VARLEN: tl.constexpr, DOT_PREC: tl.constexpr, CONFINE: tl.constexpr,
):
    if CONFINE:  # the confining re-launch (_common.launch_confined)
        if tl.load(bad) == 0:
            return
    i_m, i_bh = grid_program(tl.cdiv(T, BM))
    i_b, i_h = (i_bh // H).to(tl.int64), i_bh % H
    i_hk = (i_h // G).to(tl.int64)
    i_h = i_h.to(tl.int64)

    o_d = tl.arange(0, BLOCK_D)
    m_d = o_d < D
    i_q = i_m * BM + tl.arange(0, BM)
    m_q = i_q < T
    m_qd = m_q[:, None] & m_d[None, :]
    r_q = i_q.to(tl.int64)[:, None]
    b_q = tl.load(q + i_b * s_qb + i_h * s_qh + r_q * s_qt + o_d[None, :], mask=m_qd, other=0.0)
    b_do = tl.load(do + i_b * s_dob + i_h * s_doh + r_q * s_dot + o_d[None, :], mask=m_qd, other=0.0)
    b_o = tl.load(o + i_b * s_ob + i_h * s_oh + r_q * s_ot + o_d[None, :], mask=m_qd, other=0.0)
    b_delta = tl.sum(b_o.to(tl.float32) * b_do.to(tl.float32), 1)
    o_row = i_bh.to(tl.int64) * T + i_q
    tl.store(delta + o_row, b_delta, mask=m_q)
    b_lse = tl.load(lse + o_row, mask=m_q, other=0.0)

    p_k, p_v = k + i_b * s_kb + i_hk * s_kh, v + i_b * s_vb + i_hk * s_vh
    p_kp, p_vp = kp + i_b * s_kpb + i_hk * s_kph, vp + i_b * s_vpb + i_hk * s_vph
    qk_scale = scale * 1.4426950408889634
    b_dq = tl.zeros([BM, BLOCK_D], dtype=tl.float32)

    lo = tl.maximum(i_m * BM - W, -P)
    for i_j in range((W + BM + BN - 1) // BN):
        j = lo + i_j * BN + tl.arange(0, BN)
        b_k = load_kv_rows(p_k, p_kp, j, o_d, m_d, T, P, s_kt, s_kpt, HAS_PREFIX)
        b_v = load_kv_rows(p_v, p_vp, j, o_d, m_d, T, P, s_vt, s_vpt, HAS_PREFIX)
        b_s = tl.dot(b_q, tl.trans(b_k), input_precision=DOT_PREC) * qk_scale
        b_p = tl.exp2(b_s - b_lse[:, None])
        b_dp = tl.dot(b_do, tl.trans(b_v), input_precision=DOT_PREC)
        # masked pairs are exact zeros even where s, dp (a non-finite k or v) or delta are not; the pairs that see a
        # non-finite k carry it in ds, so the confining launch zeroes k's non-finite values in the product
        b_ds = tl.where(visible_mask(i_q, j, T, P, W, doc, IS_VARLEN), b_p * (b_dp - b_delta[:, None]), 0.0)
        if CONFINE:
            b_k = finite_rows(b_k)[0]
        b_dq += tl.dot(b_ds.to(b_k.dtype), b_k, input_precision=DOT_PREC)

    b_dq *= scale
    tl.store(dq + i_b * s_dqb + i_h * s_dqh + r_q * s_dqt + o_d[None, :], b_dq.to(dq.dtype.element_ty), mask=m_qd)
    if not CONFINE:
        flag_non_finite(bad, b_dq, b_delta, m_q)


@triton.jit
def store_kv_rows(p_main, p_prefix, j, o_d, m_d, T, P, s_t, s_pt, b, HAS_PREFIX: tl.constexpr):
    j64 = j.to(tl.int64)
    tl.store(p_main + j64[:, None] * s_t + o_d[None, :], b, mask=((j >= 0) & (j < T))[:, None] & m_d[None, :])
    if HAS_PREFIX:
        tl.store(p_prefix + (j64 + P)[:, None] * s_pt + o_d[None, :], b,
                 mask=((j < 0) & (j >= -P))[:, None] & m_d[None, :])


@triton.autotune(
    configs=configs(
        # (BM, BN, warps, stages); the first is the launch without tuning (README "Tiles")
        [triton.Config({"BM": bm, "BN": bn}, num_warps=w, num_stages=s)
         for bm, bn, w, s in [(32, 64, 4, 3), (32, 64, 4, 2), (64, 64, 4, 3), (64, 64, 4, 2), (64, 128, 8, 3)]],
        triton.Config({"BM": 16, "BN": 32}),
    ),
    do_bench=tune_bench, key=["BLOCK_D"],
)
@triton.jit
def swa_bwd_dkdv_kernel(
    q, k, v, kp, vp, do, lse, delta, dk, dv, dkp, dvp, doc, bad,
    s_qb, s_qt, s_qh, s_kb, s_kt, s_kh, s_vb, s_vt, s_vh,
    s_kpb, s_kpt, s_kph, s_vpb, s_vpt, s_vph, s_dob, s_dot, s_doh,
    s_dkb, s_dkt, s_dkh, s_dvb, s_dvt, s_dvh, s_dkpb, s_dkpt, s_dkph, s_dvpb, s_dvpt, s_dvph,
    T, P, H, scale,
    D: tl.constexpr, W: tl.constexpr, G: tl.constexpr, BLOCK_D: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr,
    HAS_PREFIX: tl.constexpr, IS_VARLEN: tl.constexpr, DOT_PREC: tl.constexpr, CONFINE: tl.constexpr,
):
    if CONFINE:  # the confining re-launch (_common.launch_confined)
        if tl.load(bad) == 0:
            return
    i_n, i_bhk = grid_program(tl.cdiv(T + P, BN))
    Hkv = H // G
    i_b, i_hk = (i_bhk // Hkv).to(tl.int64), (i_bhk % Hkv).to(tl.int64)

    o_d = tl.arange(0, BLOCK_D)
    m_d = o_d < D
    j = i_n * BN - P + tl.arange(0, BN)
    b_k = load_kv_rows(k + i_b * s_kb + i_hk * s_kh, kp + i_b * s_kpb + i_hk * s_kph, j, o_d, m_d, T, P,
                       s_kt, s_kpt, HAS_PREFIX)
    b_v = load_kv_rows(v + i_b * s_vb + i_hk * s_vh, vp + i_b * s_vpb + i_hk * s_vph, j, o_d, m_d, T, P,
                       s_vt, s_vpt, HAS_PREFIX)
    qk_scale = scale * 1.4426950408889634
    b_dk = tl.zeros([BN, BLOCK_D], dtype=tl.float32)
    b_dv = tl.zeros([BN, BLOCK_D], dtype=tl.float32)

    lo = tl.maximum(i_n * BN - P, 0)
    for g in range(G):
        i_h = (i_hk * G + g).to(tl.int64)
        p_q, p_do = q + i_b * s_qb + i_h * s_qh, do + i_b * s_dob + i_h * s_doh
        o_bh = (i_b * H + i_h) * T
        for i_t in range((W + BN + BM - 1) // BM):
            i_q = lo + i_t * BM + tl.arange(0, BM)
            m_q = i_q < T
            r_q = i_q.to(tl.int64)[:, None]
            b_q = tl.load(p_q + r_q * s_qt + o_d[None, :], mask=m_q[:, None] & m_d[None, :], other=0.0)
            b_do = tl.load(p_do + r_q * s_dot + o_d[None, :], mask=m_q[:, None] & m_d[None, :], other=0.0)
            b_lse = tl.load(lse + o_bh + i_q, mask=m_q, other=0.0)
            b_delta = tl.load(delta + o_bh + i_q, mask=m_q, other=0.0)
            # key-major [BN, BM] tiles: dV and dK come out without transposing the accumulators
            b_st = tl.dot(b_k, tl.trans(b_q), input_precision=DOT_PREC) * qk_scale
            m_vis = visible_mask(i_q, j, T, P, W, doc, IS_VARLEN, KEY_MAJOR=True)
            b_pt = tl.exp2(b_st - b_lse[None, :])
            b_dpt = tl.dot(b_v, tl.trans(b_do), input_precision=DOT_PREC)
            b_dst = tl.where(m_vis, b_pt * (b_dpt - b_delta[None, :]), 0.0)
            if CONFINE:  # non-finite q, dO rows reach only the keys their queries see (_jit_common)
                b_do, b_donan = finite_rows(b_do)
                b_pt = tl.where(m_vis, b_pt + b_donan[None, :], 0.0)
                b_q = finite_rows(b_q)[0]
            else:
                b_pt = tl.where(m_vis, b_pt, 0.0)
            b_dv += tl.dot(b_pt.to(b_do.dtype), b_do, input_precision=DOT_PREC)
            b_dk += tl.dot(b_dst.to(b_q.dtype), b_q, input_precision=DOT_PREC)

    b_dk *= scale
    store_kv_rows(dk + i_b * s_dkb + i_hk * s_dkh, dkp + i_b * s_dkpb + i_hk * s_dkph, j, o_d, m_d, T, P,
                  s_dkt, s_dkpt, b_dk.to(dk.dtype.element_ty), HAS_PREFIX)
    store_kv_rows(dv + i_b * s_dvb + i_hk * s_dvh, dvp + i_b * s_dvpb + i_hk * s_dvph, j, o_d, m_d, T, P,
                  s_dvt, s_dvpt, b_dv.to(dv.dtype.element_ty), HAS_PREFIX)
    if not CONFINE:  # dV's rows as per-row sums: a non-finite element makes its row's sum non-finite
        flag_non_finite(bad, b_dk, tl.sum(b_dv, 1), (j >= -P) & (j < T))
