"""Triton one-token decode step of the short convolution (optionally with BaseConv's SiLU and gate).

State = the last K - 1 inputs ``[B, K-1, C]``. One program per (channel block, batch row) reads the state and
the new token and writes ``y`` and the shifted state. With ``HAS_BIAS`` the in-projection bias ``b [2C]`` is
added to x and g on load.

The shifted state goes to ``new_state`` (a new buffer: the caller's state is left as it was), or with
``INPLACE`` over ``state`` itself (the decode loop's cache, which a CUDA graph then updates without a copy
kernel). In place is safe: a program touches only its own batch row and its own BC channels, and iteration i
loads row i, then stores the value it loaded over row i - 1, which that same iteration-(i-1) load had already
read; the last store (the new token over row K - 2) follows the load of row K - 2. Every load and store is a
``[BC]`` vector of one layout, so a channel's loads and stores run in one thread in program order (BC = 256 is
at least the launch's 32 * num_warps = 128 threads, so no channel is replicated across threads, where one
thread's store could overtake another's load). With ``INPLACE`` the stores go through the ``state`` pointer
itself, so the compiler sees the loads and stores may alias and keeps their order (the sm_90 PTX of Triton 3.6,
compiled on a CPU, has every state load, plain ``ld.global``, before the first state store). Not yet run on a GPU.
"""
from __future__ import annotations

import triton
import triton.language as tl

from .._jit_common import grid_program


@triton.jit
def conv_step_kernel(
    x, g, w, bias, state, y, new_state,
    s_xb, s_gb, s_yb, s_sb, s_st, s_nb, s_nt, s_wc, s_wk,
    C,
    K: tl.constexpr, GATE: tl.constexpr, HAS_STATE: tl.constexpr, HAS_BIAS: tl.constexpr, INPLACE: tl.constexpr,
    BC: tl.constexpr,
):
    i_c, i_b = grid_program(tl.cdiv(C, BC))
    i_b = i_b.to(tl.int64)
    o_c = i_c * BC + tl.arange(0, BC)
    m_c = o_c < C
    if INPLACE:  # the new state over the old one (HAS_STATE is set): stores through the same pointer
        p_n = state + i_b * s_sb + o_c
        s_n = s_st
    else:
        p_n = new_state + i_b * s_nb + o_c
        s_n = s_nt
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
        if i > 0:  # row i - 1 was loaded by iteration i - 1
            tl.store(p_n + (i - 1) * s_n, b_s.to(p_n.dtype.element_ty), mask=m_c)
    tl.store(p_n + (K - 2) * s_n, b_x.to(p_n.dtype.element_ty), mask=m_c)
    if GATE:
        b_g = tl.load(g + i_b * s_gb + o_c, mask=m_c, other=0.0).to(tl.float32)
        if HAS_BIAS:
            b_g += tl.load(bias + C + o_c, mask=m_c, other=0.0).to(tl.float32)
        b_y = b_y * tl.sigmoid(b_y) * b_g
    tl.store(y + i_b * s_yb + o_c, b_y.to(y.dtype.element_ty), mask=m_c)
