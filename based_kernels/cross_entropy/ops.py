"""Launchers, ``torch.library`` custom ops and autograd of the vocab-parallel cross entropy.

Everything works on a 2-D view ``x [N, V]`` of the logits (rows = tokens, V = this rank's vocabulary slice
starting at global id ``v_start``, last dim contiguous, any row stride) and flat targets ``t [N]``. The forward
computes per-row ``(max, sum exp, target logit)`` (``stats [3, N]``, fp32), combines them over the TP group
(``combine``) and keeps ``ms = [m; log s]`` per row (``lse = m + log s``, the two parts apart so that ``x - m``
stays exact for large logits); the backward writes ``(softmax - onehot) * dloss`` from x and ms.
Triton kernels on CUDA (or under ``TRITON_INTERPRET=1``); the ``*_torch`` functions are the same two passes in
fp32 PyTorch (the CPU path).
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist

from .._common import Launcher, cdiv, row_align
from .kernels import BWD_BLOCK_V, BWD_WARPS, ce_bwd_kernel, ce_fwd_kernel


_fwd, _bwd = Launcher(ce_fwd_kernel), Launcher(ce_bwd_kernel)

__all__ = ["CrossEntropyFunction", "cross_entropy_fwd_op", "cross_entropy_bwd_op", "combine"]


# ---------------------------------------------------------------------------------------------- the two passes
def stats_triton(x: torch.Tensor, t: torch.Tensor, v_start: int) -> torch.Tensor:
    N, V = x.shape
    stats = torch.empty(3, N, dtype=torch.float32, device=x.device)
    a = row_align(x)
    _fwd(lambda meta: (N,), (x, t, stats, x.stride(0) // a, t.stride(0), N, V, v_start), ALIGN=a)
    return stats


def stats_torch(x: torch.Tensor, t: torch.Tensor, v_start: int) -> torch.Tensor:
    x = x.float()
    V = x.shape[1]
    m = x.amax(1)
    s = torch.exp(x - m[:, None]).sum(1)
    local = t - v_start
    hit = (local >= 0) & (local < V)
    x_t = x.gather(1, local.clamp(0, V - 1).long()[:, None])[:, 0]
    return torch.stack([m, s, torch.where(hit, x_t, 0.0)])


def bwd_triton(x, t, ms, dloss, v_start, out):
    N, V = x.shape
    a = row_align(x, out)
    _bwd(lambda meta: (N, cdiv(V, BWD_BLOCK_V)),
         (x, t, ms, dloss, out, x.stride(0) // a, t.stride(0), dloss.stride(0), out.stride(0) // a, N, V, v_start),
         ALIGN=a, BLOCK_V=BWD_BLOCK_V, num_warps=BWD_WARPS)
    return out


def bwd_torch(x, t, ms, dloss, v_start, out):
    V = x.shape[1]
    dloss = dloss.float()
    d = torch.exp((x.float() - ms[0, :, None]) - ms[1, :, None]) * dloss[:, None]
    local = t - v_start
    hit = (local >= 0) & (local < V)
    d.scatter_add_(1, local.clamp(0, V - 1).long()[:, None], torch.where(hit, -dloss, 0.0)[:, None])
    return out.copy_(d)


def combine(stats: torch.Tensor, group) -> tuple[torch.Tensor, torch.Tensor]:
    """``(loss [N], ms [2, N])`` from this rank's ``stats [3, N]``; with a TP group of 2+ ranks the per-rank stats are
    all-gathered (12 bytes per row and rank) and merged in rank order, the same on every rank:
    ``M = max_r m_r``, ``S = sum_r s_r exp(m_r - M)``, ``x_t = sum_r x_t,r`` (one rank holds the target)."""
    if group is not None and dist.get_world_size(group) > 1:
        parts = [torch.empty_like(stats) for _ in range(dist.get_world_size(group))]
        dist.all_gather(parts, stats.contiguous(), group=group)
        m, s, x_t = torch.stack(parts).unbind(1)  # each [W, N]
        m_all = m.amax(0)
        s = (s * torch.exp(m - m_all)).sum(0)
        m, x_t = m_all, x_t.sum(0)
    else:
        m, s, x_t = stats.unbind(0)
    log_s = torch.log(s)
    return (m - x_t) + log_s, torch.stack([m, log_s])


# -------------------------------------------------------------------------------------------------- eager autograd
class CrossEntropyFunction(torch.autograd.Function):
    """Eager path: ``apply(x, t, v_start, group, inplace, use_triton) -> loss [N]`` (fp32).

    Saves x (the logits view itself, no copy), t and ms. ``inplace``: the backward writes the gradient into x's
    storage and returns it (no second [N, V] buffer); only safe when nothing else reads those logits after
    this loss's backward (see README)."""

    @staticmethod
    def forward(ctx, x, t, v_start, group, inplace, use_triton):
        stats = (stats_triton if use_triton else stats_torch)(x, t, v_start)
        loss, ms = combine(stats, group)
        ctx.save_for_backward(x, t, ms)
        ctx.v_start, ctx.inplace, ctx.use_triton = v_start, inplace, use_triton
        return loss

    @staticmethod
    def backward(ctx, dloss):
        x, t, ms = ctx.saved_tensors
        out = x.detach() if ctx.inplace else torch.empty_like(x, memory_format=torch.contiguous_format)
        (bwd_triton if ctx.use_triton else bwd_torch)(x, t, ms, dloss, ctx.v_start, out)
        return out, None, None, None, None, None


# ------------------------------------------------------------------------- torch.compile path: opaque custom ops
def _group(name):
    return None if name is None else dist.distributed_c10d._resolve_process_group(name)


@torch.library.custom_op("based_kernels::cross_entropy_fwd", mutates_args=())
def cross_entropy_fwd_op(x: torch.Tensor, t: torch.Tensor, v_start: int,
                         group_name: Optional[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """``(loss [N], ms [2, N])``; the TP group by name (custom ops take no process-group objects)."""
    return combine(stats_triton(x, t, v_start), _group(group_name))


@cross_entropy_fwd_op.register_fake
def _(x, t, v_start, group_name):
    return x.new_empty(x.shape[0], dtype=torch.float32), x.new_empty(2, x.shape[0], dtype=torch.float32)


@torch.library.custom_op("based_kernels::cross_entropy_bwd", mutates_args=())
def cross_entropy_bwd_op(x: torch.Tensor, t: torch.Tensor, ms: torch.Tensor, dloss: torch.Tensor,
                         v_start: int) -> torch.Tensor:
    return bwd_triton(x, t, ms, dloss, v_start, torch.empty_like(x, memory_format=torch.contiguous_format))


@cross_entropy_bwd_op.register_fake
def _(x, t, ms, dloss, v_start):
    return torch.empty_like(x, memory_format=torch.contiguous_format)


def _setup_context(ctx, inputs, output):
    x, t, v_start, _ = inputs
    ctx.save_for_backward(x, t, output[1])
    ctx.v_start = v_start


def _backward(ctx, dloss, dms):  # ms is an internal output: its gradient is ignored
    x, t, ms = ctx.saved_tensors
    return cross_entropy_bwd_op(x, t, ms, dloss, ctx.v_start), None, None, None


torch.library.register_autograd("based_kernels::cross_entropy_fwd", _backward, setup_context=_setup_context)
