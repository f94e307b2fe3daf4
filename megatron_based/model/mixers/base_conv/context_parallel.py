"""Context parallelism of the C mixer: the conv-input halo (docs/parallelism.md; the shared pieces are in
:mod:`megatron_based.model.context_parallel`)."""
from __future__ import annotations

import torch.nn.functional as F

import based_kernels

from ...context_parallel import check_unpacked, exchange_halo

__all__ = ["base_conv_cp"]


def base_conv_cp(u1, u2, weight, *, cp_group, cu_seqlens=None, layer=None):
    """BaseConv core ``SiLU(causal_conv(u1)) * u2`` over a contiguous CP shard, u1, u2 ``[B, L, C]``: the conv's
    ``initial_state`` is the previous ``k - 1`` rows of u1 (zeros before the sequence start)."""
    check_unpacked(cu_seqlens, "C")
    rows = weight.shape[1] - 1
    if cp_group.size() == 1 or rows == 0:
        return based_kernels.base_conv(u1, u2, weight)[0]
    L = u1.shape[1]
    halo = exchange_halo(u1[:, L - min(rows, L):], rows, L, cp_group, layer, "C")
    state = F.pad(halo, (0, 0, rows - halo.shape[1], 0))  # zeros before the sequence start
    return based_kernels.base_conv(u1, u2, weight, initial_state=state)[0]
