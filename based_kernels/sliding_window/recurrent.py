"""Triton one-token decode step of sliding-window attention over a ring buffer of K/V rows.

The cache holds the last ``RING = window + 1`` post-RoPE K/V rows of every sequence, position p in slot
``p % RING`` (``k_cache, v_cache [B, RING, H, D]``). For one new token per sequence at ``positions[b]`` (read on
the device: no host sync, so a CUDA graph can capture the step) one program per (head, sequence):

- writes the token's k, v into slot ``p % RING`` (in the cache's dtype);
- attends q over the slots holding positions ``max(0, p - window) .. p``: a slot r is visible iff its age
  ``(p - r) mod RING`` is at most p (the slots not yet written for a sequence younger than the ring are not);
  ``softmax(scale * q . k_r)`` weights the v rows, fp32 products and accumulation (an online softmax over blocks
  of BR slots), output in q's dtype.

The new token's own score and value come from registers (the values as stored, i.e. rounded to the cache's
dtype), and the ring loads mask its slot out, so no program reads a row that it (or another program) writes:
the result does not depend on the order of the loads and the stores. One launch replaces the mixer's
index_put x 2, the mask arithmetic and the masked ``scaled_dot_product_attention`` (a handful of kernels).
Memory-bound: each program reads its head's ring once (2 x RING x D elements). The slot loop is a run-time
loop over BR slots at a time; the launch (BR, warps, V_EARLY) is ``ops.STEP``. ``V_EARLY`` requests a block's V rows
with its K rows (kept in the cache's dtype until used) instead of after the scores, which cost each block two
memory round trips. sm_90 registers (Triton 3.6, bf16, V early, no spills unless said) at D 64 / 112 / 128: BR 8 at
1 warp 63 / 89 / 80; BR 16 at 1 warp 96 / 134 / 127, at 2 warps 72 / 118 / 113, at 4 warps 64 / 72 / 72; BR 32 at 2
warps 128 / 212 / 213; BR 64 at 2 warps 255 with ~200 bytes spilled at D >= 112 (an unrolled loop spilled too). On
an H100 at based-1.3b's decode shapes (batch 128, 16 heads, D 112, window 128; benchmarks/decode_kernels.py), us per
call: BR 8 at 1 warp 49 (the bandwidth of a copy); BR 16 at 1 / 2 / 4 / 8 warps 69 / 72 / 110 / 203. A program's
work is small (129 slots x 112 values): with one warp per program no reduction crosses warps, and more programs
share an SM.
"""
from __future__ import annotations

import triton
import triton.language as tl

from .._jit_common import grid_program


@triton.jit
def swa_step_kernel(
    q, k, v, k_cache, v_cache, positions, o,
    s_qb, s_qh, s_kb, s_kh, s_vb, s_vh, s_cb, s_cr, s_ch, s_db, s_dr, s_dh, s_ob, s_oh,
    scale, H,
    D: tl.constexpr, RING: tl.constexpr, BLOCK_D: tl.constexpr, BR: tl.constexpr, V_EARLY: tl.constexpr,
):
    i_h, i_b = grid_program(H)
    i_h, i_b = i_h.to(tl.int64), i_b.to(tl.int64)
    o_d = tl.arange(0, BLOCK_D)
    m_d = o_d < D
    p = tl.load(positions + i_b).to(tl.int64)
    slot = (p % RING).to(tl.int32)

    b_q = tl.load(q + i_b * s_qb + i_h * s_qh + o_d, mask=m_d, other=0.0).to(tl.float32)
    b_kn = tl.load(k + i_b * s_kb + i_h * s_kh + o_d, mask=m_d, other=0.0).to(k_cache.dtype.element_ty)
    b_vn = tl.load(v + i_b * s_vb + i_h * s_vh + o_d, mask=m_d, other=0.0).to(v_cache.dtype.element_ty)
    p_k = k_cache + i_b * s_cb + i_h * s_ch
    p_v = v_cache + i_b * s_db + i_h * s_dh
    tl.store(p_k + slot * s_cr + o_d, b_kn, mask=m_d)
    tl.store(p_v + slot * s_dr + o_d, b_vn, mask=m_d)

    # the new token first: a finite running max from the start (masked slots then give exp(-inf) = 0, no NaN)
    m_i = tl.sum(b_q * b_kn.to(tl.float32), 0) * scale
    l_i = tl.full([], 1.0, dtype=tl.float32)
    acc = b_vn.to(tl.float32)
    for start in range(0, RING, BR):
        o_r = start + tl.arange(0, BR)
        age = (slot - o_r + RING) % RING  # steps since slot o_r was written (for o_r < RING)
        m_r = (o_r < RING) & (o_r != slot) & (age <= p)
        m_rd = m_r[:, None] & m_d[None, :]
        b_k = tl.load(p_k + o_r[:, None] * s_cr + o_d[None, :], mask=m_rd, other=0.0)
        if V_EARLY:  # the V rows requested with the K rows: one memory round trip per block instead of two
            b_v = tl.load(p_v + o_r[:, None] * s_dr + o_d[None, :], mask=m_rd, other=0.0)
        s = tl.where(m_r, tl.sum(b_k.to(tl.float32) * b_q[None, :], 1) * scale, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 0))
        alpha = tl.exp(m_i - m_new)
        w = tl.exp(s - m_new)
        if not V_EARLY:
            b_v = tl.load(p_v + o_r[:, None] * s_dr + o_d[None, :], mask=m_rd, other=0.0)
        l_i = l_i * alpha + tl.sum(w, 0)
        acc = acc * alpha + tl.sum(w[:, None] * b_v.to(tl.float32), 0)
        m_i = m_new
    tl.store(o + i_b * s_ob + i_h * s_oh + o_d, (acc / l_i).to(o.dtype.element_ty), mask=m_d)
