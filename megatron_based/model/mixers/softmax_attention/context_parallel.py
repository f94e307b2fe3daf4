"""Context parallelism of the A mixer: K/V all-gathered along the sequence, LASP-2H style (docs/parallelism.md;
the shared pieces are in :mod:`megatron_based.model.context_parallel`)."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ....runtime import comm_stats
from ...context_parallel import cp_label

__all__ = ["softmax_attention_cp"]


class _GatherSequence(torch.autograd.Function):
    """All-gather along dim 0 over the CP group; backward reduce-scatters (sums) the gradient."""

    @staticmethod
    def forward(ctx, x, group, label):
        ctx.group, ctx.label = group, label
        out = x.new_empty((group.size() * x.shape[0],) + x.shape[1:])
        comm_stats.all_gather_into_tensor(out, x.contiguous(), group, layer=label, direction="forward")
        return out

    @staticmethod
    def backward(ctx, grad):
        out = grad.new_empty((grad.shape[0] // ctx.group.size(),) + grad.shape[1:])
        comm_stats.reduce_scatter_tensor(out, grad.contiguous(), ctx.group, layer=ctx.label, direction="backward")
        return out, None, None


def softmax_attention_cp(q, k, v, *, scale, cp_group, layer=None):
    """Causal softmax attention over a contiguous CP shard: q ``[B, H, L, D]``, k, v ``[B, H_kv, L, D]``. K/V of
    ranks 0..r are used (all-gathered, one packed collective), query t of rank r sees global keys <= r L + t."""
    r, L = cp_group.rank(), q.shape[2]
    gqa = k.shape[1] != q.shape[1]
    if cp_group.size() == 1:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale, enable_gqa=gqa)
    kv = torch.cat([k, v], dim=-1).permute(2, 0, 1, 3)  # [L, B, H_kv, Dk + Dv]: gather along the sequence
    kv = _GatherSequence.apply(kv, cp_group, cp_label(layer, "A"))[: (r + 1) * L].permute(1, 2, 0, 3)
    k_all, v_all = kv.split([k.shape[-1], v.shape[-1]], dim=-1)
    pos = torch.arange((r + 1) * L, device=q.device)
    mask = pos[None, :] <= pos[r * L:, None]
    return F.scaled_dot_product_attention(q, k_all, v_all, attn_mask=mask, scale=scale, enable_gqa=gqa)
