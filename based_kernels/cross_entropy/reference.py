"""Plain-PyTorch passes of the vocab-parallel cross entropy: the CPU path of
:func:`based_kernels.vocab_parallel_cross_entropy` (the Triton kernels' twins, fp32 math).

Both work on a 2-D view ``x [N, V]`` of this rank's logits (vocabulary slice starting at global id ``v_start``) and
flat targets ``t [N]``: ``stats_torch`` gives the per-row ``(max, sum exp, target logit)`` ``[3, N]`` that
``ops.combine`` merges over the TP group; ``bwd_torch`` writes ``(softmax - onehot) * dloss`` from x and
``ms = [m; log s]``.
"""
from __future__ import annotations

import torch

__all__ = ["stats_torch", "bwd_torch"]


def stats_torch(x: torch.Tensor, t: torch.Tensor, v_start: int) -> torch.Tensor:
    x = x.float()
    V = x.shape[1]
    m = x.amax(1)
    s = torch.exp(x - m[:, None]).sum(1)
    local = t - v_start
    hit = (local >= 0) & (local < V)
    x_t = x.gather(1, local.clamp(0, V - 1).long()[:, None])[:, 0]
    return torch.stack([m, s, torch.where(hit, x_t, 0.0)])


def bwd_torch(x, t, ms, dloss, v_start, out):
    V = x.shape[1]
    dloss = dloss.float()
    d = torch.exp((x.float() - ms[0, :, None]) - ms[1, :, None]) * dloss[:, None]
    local = t - v_start
    hit = (local >= 0) & (local < V)
    d.scatter_add_(1, local.clamp(0, V - 1).long()[:, None], torch.where(hit, -dloss, 0.0)[:, None])
    return out.copy_(d)
