"""Triton one-token decode step of the short convolution (optionally with BaseConv's SiLU and gate).

State = the last K - 1 inputs ``[B, K-1, C]``. One program per (channel block, batch row) reads the state and
the new token, writes ``y`` and the shifted state (out of place, so CUDA-graph capture of a decode loop can
ping-pong two state buffers). With ``HAS_BIAS`` the in-projection bias ``b [2C]`` is added to x and g on load.
"""
from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def conv_step_kernel(
    x, g, w, bias, state, y, new_state,
    s_xb, s_gb, s_yb, s_sb, s_st, s_nb, s_nt, s_wc, s_wk,
    C,
    K: tl.constexpr, GATE: tl.constexpr, HAS_STATE: tl.constexpr, HAS_BIAS: tl.constexpr, BC: tl.constexpr,
):
    i_c, i_b = tl.program_id(0), tl.program_id(1).to(tl.int64)
    o_c = i_c * BC + tl.arange(0, BC)
    m_c = o_c < C
    b_x = tl.load(x + i_b * s_xb + o_c, mask=m_c, other=0.0).to(tl.float32)
    if HAS_BIAS:
        b_x += tl.load(bias + o_c, mask=m_c, other=0.0).to(tl.float32)
    b_y = b_x * tl.load(w + o_c * s_wc + (K - 1) * s_wk, mask=m_c, other=0.0).to(tl.float32)
    for i in tl.static_range(K - 1):
        if HAS_STATE:
            b_s = tl.load(state + i_b * s_sb + i * s_st + o_c, mask=m_c, other=0.0)
        else:
            b_s = tl.zeros([BC], dtype=x.dtype.element_ty)
        b_y += b_s.to(tl.float32) * tl.load(w + o_c * s_wc + i * s_wk, mask=m_c, other=0.0).to(tl.float32)
        if i > 0:
            tl.store(new_state + i_b * s_nb + (i - 1) * s_nt + o_c, b_s.to(new_state.dtype.element_ty), mask=m_c)
    tl.store(new_state + i_b * s_nb + (K - 2) * s_nt + o_c, b_x.to(new_state.dtype.element_ty), mask=m_c)
    if GATE:
        b_g = tl.load(g + i_b * s_gb + o_c, mask=m_c, other=0.0).to(tl.float32)
        if HAS_BIAS:
            b_g += tl.load(bias + C + o_c, mask=m_c, other=0.0).to(tl.float32)
        b_y = b_y * tl.sigmoid(b_y) * b_g
    tl.store(y + i_b * s_yb + o_c, b_y.to(y.dtype.element_ty), mask=m_c)
