"""Triton device functions shared by the kernels of two or more op families (imported by kernel modules only;
host-side shared helpers are in ``_common.py``).

Masked products: a masked (query, key) pair must contribute an exact zero to the sums of a product of a masked
weight tile and an operand tile, but a zero weight times a NaN or inf operand is NaN. So the operand enters with its
non-finite values zeroed (:func:`finite_rows`), and the pairs that do see a non-finite row get NaN through their
weight instead (masked to exactly 0 elsewhere): the NaN reaches the rows that see it and no others. Each op's
README says which of its products do this.
"""
from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def finite_rows(b_x):
    """``(b_x with its non-finite elements zeroed, per-row [rows] fp32 0 or NaN)``: NaN marks a row that held a NaN
    or an inf, for adding to the masked weights of the rows' column (a masked weight stays exactly 0)."""
    m_ok = tl.abs(b_x) < float("inf")  # False for NaN and +-inf
    return tl.where(m_ok, b_x, 0.).to(b_x.dtype), tl.sum(tl.where(m_ok, 0., float("nan")), 1)


@triton.jit
def flag_non_finite(bad, b_x, b_r, m_rows):
    """Set ``*bad`` to 1 when a valid row (``m_rows``) of the tile ``b_x`` or of the per-row ``b_r`` is not finite.
    In the plain launches (no per-tile operand checks) a non-finite input row reaches every output row of the tiles
    it is loaded into, masked pairs included (0 * NaN), so a finite result means no non-finite input was read."""
    # counts, not a max: a max reduction may skip NaN; abs(x) < inf is False for NaN and +-inf
    n_row = tl.sum(tl.where(tl.abs(b_x) < float("inf"), 0, 1), 1) + tl.where(tl.abs(b_r) < float("inf"), 0, 1)
    n_bad = tl.sum(tl.where(m_rows, n_row, 0), 0)
    tl.store(bad, 1, mask=n_bad > 0)


@triton.jit
def grid_program(N0):
    """``(i0, i1)`` of a program whose grid ``(N0 * N1,)`` folds a 2-D grid ``(N0, N1)`` onto its first axis, i0
    varying fastest (the 2-D grid's launch order). CUDA's first grid axis takes 2^31 - 1 programs, its second and
    third 65,535 each: batch x heads, sequences or token blocks there would cap a call's shape (e.g. batch 4,096 x
    16 heads), so the kernels put them on the first axis."""
    pid = tl.program_id(0)
    return pid % N0, pid // N0


@triton.jit
def grid_program3(N0, N1):
    """``(i0, i1, i2)`` of a program whose grid ``(N0 * N1 * N2,)`` folds a 3-D grid ``(N0, N1, N2)`` onto its first
    axis (as :func:`grid_program`)."""
    i0, i12 = grid_program(N0)
    return i0, i12 % N1, i12 // N1
