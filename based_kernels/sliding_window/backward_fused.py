"""Triton backward of causal sliding-window attention in one pass over the key blocks (``BWD = "fused"`` in ops):
dQ, dK and dV from one kernel that reads q, k, v and dO once (and a small kernel that computes ``delta`` from O
and dO first): 9 tensors moved instead of the two-kernel backward's 12 (backward.py). Deterministic, no atomics.

One program per (strip of key blocks, batch x kv head). Key blocks and query blocks share one block size BB, and
query block m sees key blocks ``m - R ... m`` (``R = (W + BB - 1) // BB``). The program walks its strip's key blocks
in order and, for each, the query blocks that see it: dK and dV of the key block accumulate in registers (as in
``swa_bwd_dkdv_kernel``), each query block's dQ in an fp32 slot of the program's scratch (``acc``: R + 2 slots per
query head of the group, slot ``m % (R + 2)``; they stay in L2): its first key block writes it, the next ones add to
it, and after key block m, its last, the sum is scaled and written to dQ. A strip owns the dQ of the query blocks
whose last key block it holds; their first R key blocks may lie in the previous strip, so a strip starts R key
blocks early, adding only those blocks' dQ terms of its own query blocks (dK, dV there belong to the previous
strip). Every dQ row is summed in the same order (key block ascending) whatever the strip boundaries: the result
does not depend on the strip length.

Runs plain, then ``CONFINE`` (``_common.launch_confined``; README, "Masked pairs"): the confining launch applies
the two-kernel backward's operand checks (non-finite k rows zeroed in dQ's product, q and dO rows in dK's and
dV's).
"""
from __future__ import annotations

import triton
import triton.language as tl

from .._common import configs, tune_bench
from .._jit_common import finite_rows, flag_non_finite, grid_program
from .backward import store_kv_rows
from .forward import load_kv_rows, visible_mask

DELTA_BM = 64  # rows per program of swa_bwd_delta_kernel


@triton.jit
def swa_bwd_delta_kernel(o, do, delta, s_ob, s_ot, s_oh, s_dob, s_dot, s_doh, T, H,
                         D: tl.constexpr, BLOCK_D: tl.constexpr, BM: tl.constexpr):
    """``delta = rowsum(dO * O)`` in fp32, ``[B, H, T]``: one program per (row block, batch x head)."""
    i_m, i_bh = grid_program(tl.cdiv(T, BM))
    i_b, i_h = (i_bh // H).to(tl.int64), (i_bh % H).to(tl.int64)
    o_d = tl.arange(0, BLOCK_D)
    i_q = i_m * BM + tl.arange(0, BM)
    m_q = i_q < T
    m_qd = m_q[:, None] & (o_d < D)[None, :]
    r_q = i_q.to(tl.int64)[:, None]
    b_o = tl.load(o + i_b * s_ob + i_h * s_oh + r_q * s_ot + o_d[None, :], mask=m_qd, other=0.0)
    b_do = tl.load(do + i_b * s_dob + i_h * s_doh + r_q * s_dot + o_d[None, :], mask=m_qd, other=0.0)
    tl.store(delta + i_bh.to(tl.int64) * T + i_q, tl.sum(b_o.to(tl.float32) * b_do.to(tl.float32), 1), mask=m_q)


@triton.autotune(
    configs=configs(
        # (BB, warps, stages, register cap); the first is the launch without tuning. Uncapped, every tile needs
        # about 250 registers at d 64 (one or two programs per SM); the caps trade spills for programs in flight
        [triton.Config({"BB": bb}, num_warps=w, num_stages=s, maxnreg=r)
         for bb, w, s, r in [(32, 4, 2, 168), (32, 4, 2, None), (64, 8, 2, None), (64, 4, 2, None), (64, 4, 2, 168),
                             (64, 8, 2, 128), (32, 2, 2, None)]],
        triton.Config({"BB": 16}),
    ),
    do_bench=tune_bench, key=["BLOCK_D"],
)
@triton.jit
def swa_bwd_fused_kernel(
    q, k, v, kp, vp, do, lse, delta, dq, dk, dv, dkp, dvp, doc, acc, bad,
    s_qb, s_qt, s_qh, s_kb, s_kt, s_kh, s_vb, s_vt, s_vh,
    s_kpb, s_kpt, s_kph, s_vpb, s_vpt, s_vph, s_dob, s_dot, s_doh, s_dqb, s_dqt, s_dqh,
    s_dkb, s_dkt, s_dkh, s_dvb, s_dvt, s_dvh, s_dkpb, s_dkpt, s_dkph, s_dvpb, s_dvpt, s_dvph,
    T, P, H, scale, LT, s_acc,
    D: tl.constexpr, W: tl.constexpr, G: tl.constexpr, BLOCK_D: tl.constexpr, BB: tl.constexpr,
    HAS_PREFIX: tl.constexpr, IS_VARLEN: tl.constexpr, DOT_PREC: tl.constexpr, CONFINE: tl.constexpr,
):
    if CONFINE:  # the confining re-launch (_common.launch_confined)
        if tl.load(bad) == 0:
            return
    NQ: tl.constexpr = (W + 2 * BB - 1) // BB  # query blocks that see one key block (R + 1)
    R: tl.constexpr = NQ - 1
    n_lo = -((P + BB - 1) // BB)  # key blocks on the axis [-P, T), aligned with the query blocks at 0
    NT = tl.cdiv(T, BB)
    L = LT // BB  # key blocks per strip
    i_s, i_bhk = grid_program(tl.cdiv(NT - n_lo, L))
    Hkv = H // G
    i_b, i_hk = (i_bhk // Hkv).to(tl.int64), (i_bhk % Hkv).to(tl.int64)
    S = n_lo + i_s * L
    E = tl.minimum(S + L, NT)

    o_d = tl.arange(0, BLOCK_D)
    m_d = o_d < D
    o_r = tl.arange(0, BB)
    p_acc = acc + tl.program_id(0).to(tl.int64) * s_acc + o_r[:, None] * BLOCK_D + o_d[None, :]

    p_k, p_v = k + i_b * s_kb + i_hk * s_kh, v + i_b * s_vb + i_hk * s_vh
    p_kp, p_vp = kp + i_b * s_kpb + i_hk * s_kph, vp + i_b * s_vpb + i_hk * s_vph
    qk_scale = scale * 1.4426950408889634
    for n in range(tl.maximum(S - R, n_lo), E):
        own = n >= S  # a key block of the strip (else one of the R before it: dQ terms only)
        j = n * BB + o_r
        b_k = load_kv_rows(p_k, p_kp, j, o_d, m_d, T, P, s_kt, s_kpt, HAS_PREFIX)
        b_v = load_kv_rows(p_v, p_vp, j, o_d, m_d, T, P, s_vt, s_vpt, HAS_PREFIX)
        b_dk = tl.zeros([BB, BLOCK_D], dtype=tl.float32)
        b_dv = tl.zeros([BB, BLOCK_D], dtype=tl.float32)
        for g in range(G):
            i_h = (i_hk * G + g).to(tl.int64)
            p_q, p_do = q + i_b * s_qb + i_h * s_qh, do + i_b * s_dob + i_h * s_doh
            o_bh = (i_b * H + i_h) * T
            for t in range(NQ):
                m = n + t
                if (m >= S) & (m >= 0) & (m < NT):
                    i_q = m * BB + o_r
                    m_q = i_q < T
                    m_qd = m_q[:, None] & m_d[None, :]
                    r_q = i_q.to(tl.int64)[:, None]
                    b_q = tl.load(p_q + r_q * s_qt + o_d[None, :], mask=m_qd, other=0.0)
                    b_do = tl.load(p_do + r_q * s_dot + o_d[None, :], mask=m_qd, other=0.0)
                    b_lse = tl.load(lse + o_bh + i_q, mask=m_q, other=0.0)
                    b_delta = tl.load(delta + o_bh + i_q, mask=m_q, other=0.0)
                    # key-major [BB keys, BB queries] tiles, as swa_bwd_dkdv_kernel
                    b_st = tl.dot(b_k, tl.trans(b_q), input_precision=DOT_PREC) * qk_scale
                    m_vis = visible_mask(i_q, j, T, P, W, doc, IS_VARLEN, KEY_MAJOR=True)
                    b_pt = tl.where(m_vis, tl.exp2(b_st - b_lse[None, :]), 0.0)
                    b_dpt = tl.dot(b_v, tl.trans(b_do), input_precision=DOT_PREC)
                    b_dst = tl.where(m_vis, b_pt * (b_dpt - b_delta[None, :]), 0.0)
                    b_kq = b_k
                    if CONFINE:  # as the two kernels' confining launches (_jit_common)
                        b_do, b_donan = finite_rows(b_do)
                        b_pt = tl.where(m_vis, b_pt + b_donan[None, :], 0.0)
                        b_q = finite_rows(b_q)[0]
                        b_kq = finite_rows(b_k)[0]
                    if own:
                        b_dv += tl.dot(b_pt.to(b_do.dtype), b_do, input_precision=DOT_PREC)
                        b_dk += tl.dot(b_dst.to(b_q.dtype), b_q, input_precision=DOT_PREC)
                    # slot m % (R + 2): within one key block the R + 1 query blocks' slots differ, so one barrier
                    # per key block orders every write before the next key block's reads of it. Key block m - R
                    # (or the axis' first) brings query block m's first dQ terms: the slot is written, not read
                    p_slot = p_acc + ((m % (NQ + 1)) * G + g) * (BB * BLOCK_D)
                    b_prev = tl.load(p_slot, mask=(t < R) & (n > n_lo), other=0.0)
                    b_dq = tl.dot(tl.trans(b_dst.to(b_k.dtype)), b_kq, acc=b_prev, input_precision=DOT_PREC)
                    if t == 0:  # key block m, the last one query block m sees: its dQ is complete
                        b_dq *= scale
                        tl.store(dq + i_b * s_dqb + i_h * s_dqh + r_q * s_dqt + o_d[None, :],
                                 b_dq.to(dq.dtype.element_ty), mask=m_qd)
                        if not CONFINE:
                            flag_non_finite(bad, b_dq, b_delta, m_q)
                    else:
                        tl.store(p_slot, b_dq)
        if own:
            b_dk *= scale
            store_kv_rows(dk + i_b * s_dkb + i_hk * s_dkh, dkp + i_b * s_dkpb + i_hk * s_dkph, j, o_d, m_d, T, P,
                          s_dkt, s_dkpt, b_dk.to(dk.dtype.element_ty), HAS_PREFIX)
            store_kv_rows(dv + i_b * s_dvb + i_hk * s_dvh, dvp + i_b * s_dvpb + i_hk * s_dvph, j, o_d, m_d, T, P,
                          s_dvt, s_dvpt, b_dv.to(dv.dtype.element_ty), HAS_PREFIX)
            if not CONFINE:
                flag_non_finite(bad, b_dk, tl.sum(b_dv, 1), (j >= -P) & (j < T))
        tl.debug_barrier()  # this key block's slot writes before the next one's reads (other threads may read them)
