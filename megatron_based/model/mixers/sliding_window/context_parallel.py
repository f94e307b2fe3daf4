"""Context parallelism of the S mixer: the K/V halo (docs/parallelism.md; the shared pieces are in
:mod:`megatron_based.model.context_parallel`)."""
from __future__ import annotations

import torch

import based_kernels

from ...context_parallel import check_unpacked, exchange_halo

__all__ = ["sliding_window_attention_cp"]


def sliding_window_attention_cp(q, k, v, *, window, cp_group, cu_seqlens=None, layer=None):
    """Sliding-window attention over a contiguous CP shard: q ``[B, L, H, D]``, post-RoPE k, v ``[B, L, H_kv, D]``
    -> o ``[B, L, H, D]``. K and V travel as one packed halo of ``window`` rows (several hops if window > L)."""
    check_unpacked(cu_seqlens, "S")
    if cp_group.size() == 1:
        return based_kernels.sliding_window_attention(q, k, v, window=window)
    if window == 0:
        return based_kernels.sliding_window_attention(q, k, v, window=0)
    n = min(window, k.shape[1])
    # Rank 0's halo is empty but still passed: its exchange must stay in the graph to receive rank 1's gradients.
    halo = exchange_halo(torch.cat([k[:, -n:], v[:, -n:]], dim=-1), window, k.shape[1], cp_group, layer, "S")
    k_halo, v_halo = halo.split([k.shape[-1], v.shape[-1]], dim=-1)
    return based_kernels.sliding_window_attention(q, k, v, window=window, kv_prefix=(k_halo, v_halo))
