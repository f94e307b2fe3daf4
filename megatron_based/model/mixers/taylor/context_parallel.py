"""Context parallelism of the L mixer: state passing (docs/parallelism.md; the shared pieces are in
:mod:`megatron_based.model.context_parallel`)."""
from __future__ import annotations

from collections import deque

import torch
import torch.nn.functional as F

import based_kernels
from based_kernels.taylor_attention import symmetric_feature_map

from ....runtime import comm_stats
from ...context_parallel import check_unpacked, cp_label

__all__ = ["taylor_attention_cp", "local_state"]

STATE_CHUNK = 2048  # tokens per step of the local-state reduction (bounds the phi(K) temporary)


def local_state(k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """``phi(K)^T [V | 1]`` for k ``[B, T, H, f]``, v ``[B, T, H, d_v]``: ``[B, H, D, d_v + 1]`` in fp32 (fp64 for
    fp64 inputs); the last column is the normalizer ``z``. Reduced over T in chunks of ``STATE_CHUNK`` tokens."""
    dt = torch.promote_types(k.dtype, torch.float32)
    state = None
    for a in range(0, k.shape[1], STATE_CHUNK):
        pk = symmetric_feature_map(k[:, a:a + STATE_CHUNK].to(dt))
        ve = F.pad(v[:, a:a + STATE_CHUNK].to(dt), (0, 1), value=1.0)
        part = torch.einsum("bthd,bthe->bhde", pk, ve)
        state = part if state is None else state + part
    return state


class _ExclusivePrefix(torch.autograd.Function):
    """``S_in = sum_{j<r} S_j`` over the CP group (forward all-gather); backward ``dS_r = sum_{j>r} G_j``
    (all-gather of the incoming-state gradients). Sums run in rank order on every rank: deterministic.
    ``pending``: ``(gathered, work)`` from :func:`_start_gather`, an all-gather already in flight (the forward
    only waits on it); ``cached``: the recompute cache's S_in (no collective at all)."""

    @staticmethod
    def forward(ctx, state, group, label, cached, pending=None):
        ctx.group, ctx.label = group, label
        if cached is not None:
            return cached
        r = group.rank()
        if pending is None:
            pending = _start_gather(state, group, label, async_op=False)
        gathered, work = pending
        if work is not None:
            work.wait()
        s_in = torch.zeros_like(state)
        for j in range(r):
            s_in += gathered[j]
        return s_in

    @staticmethod
    def backward(ctx, grad):
        group = ctx.group
        gathered = grad.new_empty((group.size(),) + grad.shape)
        comm_stats.all_gather_into_tensor(gathered, grad.contiguous(), group, layer=ctx.label, direction="backward")
        d_state = torch.zeros_like(grad)
        for j in range(group.rank() + 1, group.size()):
            d_state += gathered[j]
        return d_state, None, None, None, None


def _start_gather(state, group, label, *, async_op=True):
    """Issue the forward all-gather of the local state (``async_op``: return without waiting)."""
    state = state.detach().contiguous()
    gathered = state.new_empty((group.size(),) + state.shape)
    work = comm_stats.all_gather_into_tensor(gathered, state, group, layer=label, direction="forward",
                                             async_op=async_op)
    return gathered, work


def _merge_incoming(q, y_l, den_l, s_in, eps):
    """Exact merge of the incoming state into a zero-state local pass, in fp32 (fp64 for fp64 inputs):
    ``y = (y_l (den_l + eps) + phi(q) S_in) / (den_l + phi(q) . z_in + eps)``; ``s_in`` is ``[B, H, D, d_v + 1]``
    (last column z_in). phi(q) is formed ``STATE_CHUNK`` tokens at a time."""
    dt = s_in.dtype
    dv = y_l.shape[-1]
    outs = []
    for a in range(0, q.shape[1], STATE_CHUNK):
        b = a + STATE_CHUNK
        inc = torch.einsum("bthd,bhde->bthe", symmetric_feature_map(q[:, a:b].to(dt)), s_in)  # [B, t, H, d_v + 1]
        den = den_l[:, a:b].to(dt)
        num = y_l[:, a:b].to(dt) * (den + eps).unsqueeze(-1) + inc[..., :dv]
        outs.append(num / (den + inc[..., dv] + eps).unsqueeze(-1))
    return torch.cat(outs, dim=1).to(y_l.dtype)


def taylor_attention_cp(q, k, v, *, eps, cp_group, cu_seqlens=None, layer=None):
    """Causal Taylor linear attention over a contiguous CP shard: q, k ``[B, L, H, f]``, v ``[B, L, H, d_v]`` ->
    ``y [B, L, H, d_v]``, equal to the single-rank result on the full sequence. ``layer`` (the calling module)
    names the layer for comm_stats and holds the recompute cache.

    The forward all-gather of the local state runs asynchronously while the local (zero initial state) attention
    is computed; the incoming state is then merged exactly into numerator and denominator
    (:func:`_merge_incoming`)."""
    check_unpacked(cu_seqlens, "L")
    if cp_group.size() == 1:
        return based_kernels.taylor_linear_attention(q, k, v, eps=eps)[0]
    label = cp_label(layer, "L")
    state = local_state(k, v)
    recompute = (layer is not None and layer.training
                 and getattr(layer.config, "recompute_granularity", None) == "full")
    cache = layer.__dict__.setdefault("_cp_received", deque()) if recompute else None
    cached = None
    if recompute and torch.is_grad_enabled():  # the recompute: reuse what the first forward received
        cached = cache.popleft() if cache else None
    pending = _start_gather(state, cp_group, label) if cached is None else None
    # local attention while the gather is in flight
    y_l, _, den_l = based_kernels.taylor_linear_attention(q, k, v, eps=eps, output_normalizer=True)
    s_in = _ExclusivePrefix.apply(state, cp_group, label, cached, pending)
    if recompute and not torch.is_grad_enabled():
        cache.append(s_in)
    return _merge_incoming(q, y_l, den_l, s_in, eps)
