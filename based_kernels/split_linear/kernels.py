"""Triton kernel of ``split_linear``: ``y = x @ w^T (+ b)`` with the reduction over K split across S programs per
output tile, for products with few rows (decode: M = batch) and few output columns, where one program per output
tile leaves most SMs idle.

Grid ``(cdiv(N, BN), S, cdiv(M, BM))``: program (n, s, m) multiplies rows ``m`` of x by columns ``n`` of w^T over
its K slice ``[s * K_PER, (s + 1) * K_PER)`` into an fp32 ``[BM, BN]`` tile. With S = 1 it writes y. Otherwise it
writes the tile to its slot of the fp32 workspace ``part [S, M, N]`` and increments the tile's counter; the program
that brings the counter to S (the last of the tile's S to finish) sums the S slots in the order s = 0 .. S - 1 (the
same sum whichever program is last: deterministic), adds the bias, writes y and sets the counter back to 0 (so the
next launch, or a CUDA-graph replay, starts from 0). The partials are written before a CTA barrier and the counter's
release-acquire atomic; the last program reads them through L2 (``.cg``), not its SM's L1.
"""
from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def split_linear_kernel(x, w, b, y, part, count, M, N, K, K_PER, s_xm, s_wn, s_ym,
                        HAS_BIAS: tl.constexpr, S: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr,
                        BK: tl.constexpr):
    i_n, i_s, i_m = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    o_m = i_m * BM + tl.arange(0, BM)
    o_n = i_n * BN + tl.arange(0, BN)
    o_k = tl.arange(0, BK)
    m_m, m_n = o_m < M, o_n < N
    k_lo = i_s * K_PER
    k_hi = tl.minimum(k_lo + K_PER, K)
    acc = tl.zeros([BM, BN], dtype=tl.float32)
    for k in range(k_lo, k_hi, BK):
        m_k = (k + o_k) < k_hi
        b_x = tl.load(x + o_m[:, None].to(tl.int64) * s_xm + (k + o_k)[None, :], mask=m_m[:, None] & m_k[None, :],
                      other=0.)
        # w^T's [BK, BN] tile from w [N, K] (K contiguous)
        b_w = tl.load(w + o_n[None, :].to(tl.int64) * s_wn + (k + o_k)[:, None], mask=m_n[None, :] & m_k[:, None],
                      other=0.)
        acc = tl.dot(b_x, b_w, acc)
    m_y = m_m[:, None] & m_n[None, :]
    p_y = y + o_m[:, None].to(tl.int64) * s_ym + o_n[None, :]
    if S == 1:
        if HAS_BIAS:
            acc += tl.load(b + o_n, mask=m_n, other=0.).to(tl.float32)[None, :]
        tl.store(p_y, acc.to(y.dtype.element_ty), mask=m_y)
    else:
        o_p = o_m[:, None].to(tl.int64) * N + o_n[None, :]
        tl.store(part + i_s.to(tl.int64) * M * N + o_p, acc, mask=m_y)
        tl.debug_barrier()  # every thread's partial stored before the counter's release
        tile = i_m * tl.num_programs(0) + i_n
        done = tl.atomic_add(count + tile, 1, sem="acq_rel", scope="gpu")
        if done == S - 1:
            tot = tl.zeros([BM, BN], dtype=tl.float32)
            for s in tl.static_range(S):
                tot += tl.load(part + s * M * N + o_p, mask=m_y, other=0., cache_modifier=".cg")
            if HAS_BIAS:
                tot += tl.load(b + o_n, mask=m_n, other=0.).to(tl.float32)[None, :]
            tl.store(p_y, tot.to(y.dtype.element_ty), mask=m_y)
            tl.atomic_xchg(count + tile, 0)
