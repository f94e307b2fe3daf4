"""Triton forward of causal sliding-window attention (online softmax over the keys t - W ... t only).

One program per (query block, batch x head). Keys live on a virtual axis ``j in [-P, T)``: rows ``j < 0`` come
from the ``kv_prefix`` tensors (the context-parallel halo), rows ``j >= 0`` from k, v. The key loop starts at the
first key of the window of the block's first query, unaligned, so a block of BM queries visits exactly
``W + BM`` keys (3 key blocks at W = 128, BM = BN = 64) instead of every causal key block. W and the GQA
group size are compile-time constants (a model has one window), so every loop has a constant trip count.
Every kernel of the family runs twice per call, plain and then ``CONFINE`` (``_common.launch_confined``; README,
"Masked pairs").
"""
from __future__ import annotations

import triton
import triton.language as tl

from .._common import INTERPRET, configs, tune_bench
from .._jit_common import finite_rows, flag_non_finite, grid_program

LOG2E = 1.4426950408889634


@triton.jit
def load_kv_rows(p_main, p_prefix, j, o_d, m_d, T, P, s_t, s_pt, HAS_PREFIX: tl.constexpr):
    """Rows ``j`` (virtual axis) of K or V as ``[len(j), BLOCK_D]``; zero outside ``[-P, T)``."""
    j64 = j.to(tl.int64)
    m_main = (j >= 0) & (j < T)
    b = tl.load(p_main + j64[:, None] * s_t + o_d[None, :], mask=m_main[:, None] & m_d[None, :], other=0.0)
    if HAS_PREFIX:
        m_pre = (j < 0) & (j >= -P)
        b += tl.load(p_prefix + (j64 + P)[:, None] * s_pt + o_d[None, :], mask=m_pre[:, None] & m_d[None, :],
                     other=0.0)
    return b


@triton.jit
def visible_mask(i_q, j, T, P, W, doc, IS_VARLEN: tl.constexpr, KEY_MAJOR: tl.constexpr = False):
    """Mask of (query, key) pairs inside the causal window (and the same document): ``[len(i_q), len(j)]``, or
    ``[len(j), len(i_q)]`` with KEY_MAJOR (built in that orientation: transposing a register tile costs a
    shared-memory round trip)."""
    if KEY_MAJOR:
        q2, k2 = i_q[None, :], j[:, None]
    else:
        q2, k2 = i_q[:, None], j[None, :]
    m = (k2 <= q2) & (k2 >= q2 - W) & (k2 >= -P) & (q2 < T)
    if IS_VARLEN:
        d_q = tl.load(doc + i_q, mask=(i_q >= 0) & (i_q < T), other=-1)
        d_k = tl.load(doc + j, mask=(j >= 0) & (j < T), other=-2)
        if KEY_MAJOR:
            m = m & (d_q[None, :] == d_k[:, None])
        else:
            m = m & (d_q[:, None] == d_k[None, :])
    return m


@triton.autotune(
    configs=configs(
        # (BM, BN, warps, stages, register cap): timed by the autotuner; the first is the launch without tuning.
        # The 4-warp tiles capped at 128 registers run 4 programs per SM instead of 2 and were the fastest on an H100
        # (benchmarks/swa_tiles.py, README "Tiles")
        [triton.Config({"BM": bm, "BN": bn}, num_warps=w, num_stages=s, maxnreg=r)
         for bm, bn, w, s, r in [(64, 64, 4, 3, 128), (64, 32, 4, 3, 128), (64, 64, 4, 3, None), (64, 32, 4, 2, None),
                                 (128, 64, 8, 3, None)]],
        triton.Config({"BM": 16, "BN": 32}),
    ),
    do_bench=tune_bench, key=["BLOCK_D"],  # few keys: every autotune key costs compiles of all configs
)
@triton.jit
def swa_fwd_kernel(
    q, k, v, kp, vp, o, lse, doc, bad,
    s_qb, s_qt, s_qh, s_kb, s_kt, s_kh, s_vb, s_vt, s_vh,
    s_kpb, s_kpt, s_kph, s_vpb, s_vpt, s_vph, s_ob, s_ot, s_oh,
    T, P, H, scale,
    D: tl.constexpr, W: tl.constexpr, G: tl.constexpr, BLOCK_D: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr,
    HAS_PREFIX: tl.constexpr, IS_VARLEN: tl.constexpr, DOT_PREC: tl.constexpr, CONFINE: tl.constexpr,
):
    if CONFINE:  # the confining re-launch (_common.launch_confined): only after a plain program flagged a result
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
    p_q = q + i_b * s_qb + i_h * s_qh + i_q.to(tl.int64)[:, None] * s_qt + o_d[None, :]
    b_q = tl.load(p_q, mask=m_q[:, None] & m_d[None, :], other=0.0)

    p_k, p_v = k + i_b * s_kb + i_hk * s_kh, v + i_b * s_vb + i_hk * s_vh
    p_kp, p_vp = kp + i_b * s_kpb + i_hk * s_kph, vp + i_b * s_vpb + i_hk * s_vph

    qk_scale = scale * 1.4426950408889634  # softmax in base 2
    b_m = tl.full([BM], -1.0e30, dtype=tl.float32)  # finite: a fully masked block leaves exp2(0) = 1 factors
    b_l = tl.zeros([BM], dtype=tl.float32)
    b_acc = tl.zeros([BM, BLOCK_D], dtype=tl.float32)

    # constexpr trip count (W + BM keys); blocks past the causal edge or the sequence are fully masked
    lo = tl.maximum(i_m * BM - W, -P)
    for i_j in range((W + BM + BN - 1) // BN):
        j = lo + i_j * BN + tl.arange(0, BN)
        b_k = load_kv_rows(p_k, p_kp, j, o_d, m_d, T, P, s_kt, s_kpt, HAS_PREFIX)
        b_v = load_kv_rows(p_v, p_vp, j, o_d, m_d, T, P, s_vt, s_vpt, HAS_PREFIX)
        b_s = tl.dot(b_q, tl.trans(b_k), input_precision=DOT_PREC) * qk_scale
        m_vis = visible_mask(i_q, j, T, P, W, doc, IS_VARLEN)
        b_s = tl.where(m_vis, b_s, float("-inf"))  # also drops a non-finite k of masked pairs
        b_m_new = tl.maximum(b_m, tl.max(b_s, 1))
        b_alpha = tl.exp2(b_m - b_m_new)
        b_p = tl.exp2(b_s - b_m_new[:, None])
        b_l = b_l * b_alpha + tl.sum(b_p, 1)
        if CONFINE:  # a non-finite v row reaches only the queries that see it (_jit_common)
            b_v, b_vnan = finite_rows(b_v)
            b_p = tl.where(m_vis, b_p + b_vnan[None, :], 0.0)
        b_acc = b_acc * b_alpha[:, None] + tl.dot(b_p.to(b_v.dtype), b_v, input_precision=DOT_PREC)
        b_m = b_m_new

    b_l = tl.where(m_q, b_l, 1.0)  # rows past T saw no key
    b_acc = b_acc / b_l[:, None]
    b_lse = b_m + tl.log2(b_l)
    p_o = o + i_b * s_ob + i_h * s_oh + i_q.to(tl.int64)[:, None] * s_ot + o_d[None, :]
    tl.store(p_o, b_acc.to(o.dtype.element_ty), mask=m_q[:, None] & m_d[None, :])
    # log2-sum-exp2 of the scaled scores, [B, H, T] fp32: what the backward needs to rebuild P
    tl.store(lse + i_bh.to(tl.int64) * T + i_q, b_lse, mask=m_q)
    if not CONFINE:
        flag_non_finite(bad, b_acc, b_lse, m_q)


__all__ = ["swa_fwd_kernel", "load_kv_rows", "visible_mask", "INTERPRET", "LOG2E"]
