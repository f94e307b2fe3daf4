"""Triton kernels of the fused RoPE + q/k/v split: one pass over the packed projection forward, one backward.

Rows are tokens ``n = t * B + b`` of a ``[s, b, ...]`` tensor (t the sequence index, b the batch row); one
program takes BLOCK_N rows of one query group g and every head of that group: its G query heads and its key head
rotated, its value head copied. A head's two halves ``x1 = x[:D/2]``, ``x2 = x[D/2:]`` are loaded as two tiles, so
the rotation needs no shuffle: ``y1 = x1 cos - x2 sin``, ``y2 = x2 cos + x1 sin`` (Megatron's non-interleaved
rotate-half), with cos / sin from fp32 tables ``[s, D/2]`` (loaded once per program, shared by all heads), or
for explicit per-token positions (prefill, decode) computed in the kernel from them, and fp32 math; the backward
applies the inverse rotation (``sin -> -sin``). D/2 need not be a power of two (masked).
"""
from __future__ import annotations

import triton
import triton.language as tl

from .._common import configs, tune_bench

_CONFIGS = configs([triton.Config({"BLOCK_N": bn}, num_warps=w) for bn, w in ((32, 4), (64, 4), (128, 8))],
                   triton.Config({"BLOCK_N": 16}, num_warps=1))


@triton.jit
def _tile(i_n, N, B, BLOCK_N: tl.constexpr, BLOCK_H: tl.constexpr, HALF: tl.constexpr):
    """Row indices of this program's tokens: (t [BLOCK_N, 1], b [BLOCK_N, 1]) as int64, the column index within
    a half [1, BLOCK_H] and the load/store mask (no column mask when BLOCK_H == HALF)."""
    o_n = i_n * BLOCK_N + tl.arange(0, BLOCK_N)
    o_h = tl.arange(0, BLOCK_H)[None, :]
    o_t = o_n // B
    o_b = o_n - o_t * B
    if BLOCK_H == HALF:
        m = (o_n < N)[:, None]
    else:
        m = (o_n < N)[:, None] & (o_h < HALF)
    return o_t.to(tl.int64)[:, None], o_b.to(tl.int64)[:, None], o_h, m


@triton.jit
def _cos_sin(cos_ptr, sin_ptr, pos_ptr, inv_ptr, o_t, o_row, o_h, m, HALF: tl.constexpr,
             POSITIONS: tl.constexpr):
    """cos / sin ``[BLOCK_N, BLOCK_H]`` fp32 of this program's tokens. Without POSITIONS: rows ``o_t`` of the
    tables ``[s, HALF]`` (positions offset + t). With POSITIONS: token ``o_row``'s position from ``pos_ptr``
    (int64 ``[s, b]``) times ``inv_ptr`` (fp64 ``[HALF]``) and its cos / sin in fp64 (libdevice's __nv_cos /
    __nv_sin: fp64 has no approximate form), rounded once: the values ``reference.rope_tables_at`` computes."""
    if POSITIONS:
        angle = tl.load(pos_ptr + o_row, mask=m, other=0).to(tl.float64) * tl.load(inv_ptr + o_h, mask=o_h < HALF,
                                                                                   other=0.0)
        return tl.cos(angle).to(tl.float32), tl.sin(angle).to(tl.float32)
    else:
        return (tl.load(cos_ptr + o_t * HALF + o_h, mask=m, other=0.0),
                tl.load(sin_ptr + o_t * HALF + o_h, mask=m, other=0.0))


@triton.autotune(configs=_CONFIGS, do_bench=tune_bench, key=["G", "D", "POSITIONS"])
@triton.jit
def rope_fwd_kernel(qkv_ptr, cos_ptr, sin_ptr, pos_ptr, inv_ptr, q_ptr, k_ptr, v_ptr, s_t, s_b, s_g, N, B, NG,
                    G: tl.constexpr, D: tl.constexpr, POSITIONS: tl.constexpr, BLOCK_H: tl.constexpr,
                    BLOCK_N: tl.constexpr):
    """qkv ``[s, b, NG, (G + 2) * D]`` (strides s_t, s_b, s_g; last dim contiguous) -> q ``[s, b, NG * G, D]``,
    k, v ``[s, b, NG, D]`` (contiguous). Grid ``(cdiv(N, BLOCK_N), NG)`` with N = s * b. Angles from the tables
    or, with POSITIONS, from per-token positions (``_cos_sin``)."""
    HALF: tl.constexpr = D // 2
    i_n, i_g = tl.program_id(0), tl.program_id(1)
    o_t, o_b, o_h, m = _tile(i_n, N, B, BLOCK_N, BLOCK_H, HALF)
    o_row = o_t * B + o_b  # the token's row in [s, b] (contiguous outputs and positions)
    b_cos, b_sin = _cos_sin(cos_ptr, sin_ptr, pos_ptr, inv_ptr, o_t, o_row, o_h, m, HALF, POSITIONS)
    p_x = qkv_ptr + o_t * s_t + o_b * s_b + i_g * s_g + o_h
    for j in tl.static_range(G + 1):  # G query heads, then the key head
        b_x1 = tl.load(p_x + j * D, mask=m, other=0.0).to(tl.float32)
        b_x2 = tl.load(p_x + j * D + HALF, mask=m, other=0.0).to(tl.float32)
        if j < G:
            p_y = q_ptr + o_row * (NG * G * D) + (i_g * G + j) * D + o_h
        else:
            p_y = k_ptr + o_row * (NG * D) + i_g * D + o_h
        tl.store(p_y, (b_x1 * b_cos - b_x2 * b_sin).to(q_ptr.dtype.element_ty), mask=m)
        tl.store(p_y + HALF, (b_x2 * b_cos + b_x1 * b_sin).to(q_ptr.dtype.element_ty), mask=m)
    p_v = v_ptr + o_row * (NG * D) + i_g * D + o_h
    tl.store(p_v, tl.load(p_x + (G + 1) * D, mask=m), mask=m)
    tl.store(p_v + HALF, tl.load(p_x + (G + 1) * D + HALF, mask=m), mask=m)


@triton.autotune(configs=_CONFIGS, do_bench=tune_bench, key=["G", "D", "POSITIONS"])
@triton.jit
def rope_bwd_kernel(dq_ptr, dk_ptr, dv_ptr, cos_ptr, sin_ptr, pos_ptr, inv_ptr, dqkv_ptr, s_dq_t, s_dq_b, s_dq_h,
                    s_dk_t, s_dk_b, s_dk_h, s_dv_t, s_dv_b, s_dv_h, s_t, s_b, s_g, N, B,
                    G: tl.constexpr, D: tl.constexpr, POSITIONS: tl.constexpr, BLOCK_H: tl.constexpr,
                    BLOCK_N: tl.constexpr):
    """dq ``[s, b, NG * G, D]``, dk, dv ``[s, b, NG, D]`` (any strides, last dim contiguous) -> dqkv
    ``[s, b, NG, (G + 2) * D]`` (strides s_t, s_b, s_g): the inverse rotation of dq and dk, dv copied."""
    HALF: tl.constexpr = D // 2
    i_n, i_g = tl.program_id(0), tl.program_id(1)
    o_t, o_b, o_h, m = _tile(i_n, N, B, BLOCK_N, BLOCK_H, HALF)
    b_cos, b_sin = _cos_sin(cos_ptr, sin_ptr, pos_ptr, inv_ptr, o_t, o_t * B + o_b, o_h, m, HALF, POSITIONS)
    p_dx = dqkv_ptr + o_t * s_t + o_b * s_b + i_g * s_g + o_h
    for j in tl.static_range(G + 1):
        if j < G:
            p_d = dq_ptr + o_t * s_dq_t + o_b * s_dq_b + (i_g * G + j) * s_dq_h + o_h
        else:
            p_d = dk_ptr + o_t * s_dk_t + o_b * s_dk_b + i_g * s_dk_h + o_h
        b_d1 = tl.load(p_d, mask=m, other=0.0).to(tl.float32)
        b_d2 = tl.load(p_d + HALF, mask=m, other=0.0).to(tl.float32)
        tl.store(p_dx + j * D, (b_d1 * b_cos + b_d2 * b_sin).to(dqkv_ptr.dtype.element_ty), mask=m)
        tl.store(p_dx + j * D + HALF, (b_d2 * b_cos - b_d1 * b_sin).to(dqkv_ptr.dtype.element_ty), mask=m)
    p_dv = dv_ptr + o_t * s_dv_t + o_b * s_dv_b + i_g * s_dv_h + o_h
    tl.store(p_dx + (G + 1) * D, tl.load(p_dv, mask=m).to(dqkv_ptr.dtype.element_ty), mask=m)
    tl.store(p_dx + (G + 1) * D + HALF, tl.load(p_dv + HALF, mask=m).to(dqkv_ptr.dtype.element_ty), mask=m)
