"""The functional API of the vocab-parallel cross entropy (checks, backend dispatch), its launchers, the TP merge,
autograd Function (eager) and ``torch.library`` custom ops (torch.compile).

Everything works on a 2-D view ``x [N, V]`` of the logits (rows = tokens, V = this rank's vocabulary slice
starting at global id ``v_start``, last dim contiguous, any row stride) and flat targets ``t [N]``. The forward
computes per-row ``(max, sum exp, target logit)`` (``stats [3, N]``, fp32), combines them over the TP group
(``combine``) and keeps ``ms = [m; log s]`` per row (``lse = m + log s``, the two parts apart so that ``x - m``
stays exact for large logits); the backward writes ``(softmax - onehot) * dloss`` from x and ms.
Triton kernels on CUDA (or under ``TRITON_INTERPRET=1``); ``reference.py``'s ``*_torch`` functions are the same
two passes in fp32 PyTorch (the CPU path).
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist

from .._common import Launcher, cdiv, resolve_backend, row_align
from .kernels import BWD_BLOCK_V, BWD_WARPS, ce_bwd_kernel, ce_fwd_kernel
from .reference import bwd_torch, stats_torch

_fwd, _bwd = Launcher(ce_fwd_kernel), Launcher(ce_bwd_kernel)

__all__ = ["vocab_parallel_cross_entropy", "CrossEntropyFunction", "cross_entropy_fwd_op", "cross_entropy_bwd_op",
           "combine"]


# ------------------------------------------------------------------------------------------- the functional API
_TRITON_DTYPES = (torch.bfloat16, torch.float16, torch.float32)


def vocab_parallel_cross_entropy(logits: torch.Tensor, target: torch.Tensor, tp_group=None, *,
                                 inplace_backward: bool = False, backend=None) -> torch.Tensor:
    """Per-token ``loss = logsumexp(logits) - logits[target]`` (fp32, shape ``target.shape``).

    logits ``[..., V_local]`` (bf16 / fp16 / fp32; last dim contiguous avoids a copy): rank r of ``tp_group``
    holds the vocabulary slice ``[r * V_local, (r + 1) * V_local)``, as in Megatron; ``tp_group=None`` means
    one rank (the whole vocabulary). target ``[...]`` int64 / int32 global ids; a target outside every slice
    gives ``loss = logsumexp`` and no one-hot term (Megatron's behaviour). The gradient is
    ``(softmax - onehot) * dloss`` in the logits dtype (fp32 math). Deterministic.

    inplace_backward: write the gradient into the logits' storage instead of a new buffer (saves one
    ``[N, V_local]`` tensor; only when nothing else reads the logits after this backward; eager mode only).
    backend: None (Triton for CUDA tensors, PyTorch otherwise, or ``based_kernels.use_backend``), "triton",
    "torch".
    """
    if logits.dim() < 1 or logits.shape[-1] < 1:
        raise ValueError(f"logits must be [..., V_local] with V_local >= 1; got {tuple(logits.shape)}")
    if tuple(target.shape) != tuple(logits.shape[:-1]):
        raise ValueError(f"target {tuple(target.shape)} must be logits.shape[:-1] = {tuple(logits.shape[:-1])}")
    if target.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"target must hold int64 or int32 token ids; got {target.dtype}")
    if target.device != logits.device:
        raise ValueError(f"logits ({logits.device}) and target ({target.device}) are on different devices")
    if not logits.is_floating_point():
        raise TypeError(f"logits must be floating point; got {logits.dtype}")
    V = logits.shape[-1]
    world = 1 if tp_group is None else dist.get_world_size(tp_group)
    group = tp_group if world > 1 else None
    v_start = dist.get_rank(tp_group) * V if world > 1 else 0
    x = logits.reshape(-1, V)
    if x.stride(1) != 1:
        x = x.contiguous()
    t = target.reshape(-1)
    use_triton = resolve_backend(backend, logits) == "triton" and x.shape[0] > 0
    if use_triton and logits.dtype not in _TRITON_DTYPES:
        raise TypeError(f"the Triton cross entropy takes {_TRITON_DTYPES} logits; got {logits.dtype} "
                        f"(use backend='torch')")
    if use_triton and torch.compiler.is_compiling():
        loss = cross_entropy_fwd_op(x, t, v_start, None if group is None else group.group_name)[0]
    else:
        loss = CrossEntropyFunction.apply(x, t, v_start, group, inplace_backward, use_triton)
    return loss.view(target.shape)


# ------------------------------------------------------------------------------------- the two passes in Triton
def stats_triton(x: torch.Tensor, t: torch.Tensor, v_start: int) -> torch.Tensor:
    N, V = x.shape
    stats = torch.empty(3, N, dtype=torch.float32, device=x.device)
    a = row_align(x)
    _fwd(lambda meta: (N,), (x, t, stats, x.stride(0) // a, t.stride(0), N, V, v_start), ALIGN=a)
    return stats


def bwd_triton(x, t, ms, dloss, v_start, out):
    N, V = x.shape
    a = row_align(x, out)
    _bwd(lambda meta: (N, cdiv(V, BWD_BLOCK_V)),
         (x, t, ms, dloss, out, x.stride(0) // a, t.stride(0), dloss.stride(0), out.stride(0) // a, N, V, v_start),
         ALIGN=a, BLOCK_V=BWD_BLOCK_V, num_warps=BWD_WARPS)
    return out


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
