"""Context parallelism on contiguous sequence shards (docs/parallelism.md): the pieces several mixers share.

CP rank r of P holds tokens ``[r * L, (r + 1) * L)`` of every sequence (never Megatron's zig-zag layout). Per
layer and direction each mixer issues one collective whose size does not depend on L; each mixer's own exchange
lives in its folder (``megatron_based/model/mixers/<mixer>/context_parallel.py``):

- L (Taylor linear attention, ``mixers/taylor``): the packed fp32 local state ``phi(K_r)^T [V_r | 1]`` is
  all-gathered asynchronously while rank r runs its local attention with zero initial state (returning the
  denominator too); the exclusive prefix ``S_in = sum_{j<r} S_j`` (fixed order) is then merged exactly into
  numerator and denominator. Backward all-gathers ``G_j = dL/dS_in`` and feeds ``sum_{j>r} G_j`` into the local
  state's gradient.
- S (sliding-window attention, ``mixers/sliding_window``): the last ``window`` post-RoPE K/V rows go to the next
  rank(s) by P2P (:func:`exchange_halo`, below) and become the kernel's ``kv_prefix``; their gradients come back
  the same way. ``window > L`` uses several hops.
- C (BaseConv, ``mixers/base_conv``): the same halo for the last ``k - 1`` rows of u1, used as the conv's
  ``initial_state``.
- A (softmax layers of hybrids, ``mixers/softmax_attention``): K/V all-gathered along the sequence, causal mask
  offset by ``r * L``; gradients reduce-scattered.

Under full activation recompute (``recompute_granularity="full"``) the L, S and C layers keep what they received in
the first forward and reuse it in the recompute (:func:`_exchange`): no forward collective is issued twice. All
collectives go through :mod:`megatron_based.runtime.comm_stats`, so tests and benchmarks can count them.

The data path shards batches with :func:`shard_batch_for_cp` and normalises the loss with
:func:`loss_over_global_tokens` (see docs/parallelism.md, "Training with CP").
"""
from __future__ import annotations

from collections import deque

import torch

from ..runtime import comm_stats

__all__ = ["shard_batch_for_cp", "loss_over_global_tokens"]


# ---------------------------------------------------------------------------------------------- recompute cache
def cp_label(layer, kind: str) -> str:
    number = getattr(layer, "layer_number", None)
    return kind if number is None else f"{number}{kind}"


def _exchange(layer, communicate):
    """``communicate(cached)`` applies a collective's autograd Function; under full recompute the first (no-grad)
    forward stores the received tensor on ``layer`` and the recompute passes it back as ``cached`` (FIFO, so
    several micro-batches in flight under pipeline parallelism pop in the order they were pushed)."""
    recompute = (layer is not None and layer.training
                 and getattr(layer.config, "recompute_granularity", None) == "full")
    if not recompute:
        return communicate(None)
    cache = layer.__dict__.setdefault("_cp_received", deque())
    if torch.is_grad_enabled():
        return communicate(cache.popleft() if cache else None)
    out = communicate(None)
    cache.append(out)
    return out


def check_unpacked(cu_seqlens, kind: str) -> None:
    if cu_seqlens is not None:
        raise NotImplementedError(
            f"packed sequences (cu_seqlens) are not supported with context_parallel_size > 1 in '{kind}' layers: "
            "use unpacked [b, s] batches, or context_parallel_size=1 for packed data")


# ---------------------------------------------------------------------------------------- halo (S and C layers)
def _hop_rows(rows: int, local_len: int, hops: int) -> list[int]:
    """Rows that rank r + h needs from rank r, h = 1..hops: the last ``rows - (h-1) L`` rows, at most L."""
    return [min(local_len, rows - (h - 1) * local_len) for h in range(1, hops + 1)]


class _Halo(torch.autograd.Function):
    """Receive the ``rows`` rows preceding this rank's shard (fewer on the first ranks: positions < 0 do not exist)
    from ranks r-1, r-2, ... in one batched P2P exchange; backward sends the halo's gradient back to its owners.

    ``tail`` is the last ``min(rows, L)`` rows of the local shard ``[B, ., ...]`` (sequence on dim 1)."""

    @staticmethod
    def forward(ctx, tail, rows, local_len, group, label, cached):
        r, P = group.rank(), group.size()
        hops = min(-(-rows // local_len), P - 1)
        ctx.parts = [(h, m) for h, m in enumerate(_hop_rows(rows, local_len, hops), start=1)]
        ctx.group, ctx.label, ctx.r, ctx.P = group, label, r, P
        if cached is not None:
            return cached
        n = tail.shape[1]
        sends = [(tail[:, n - m:].contiguous(), r + h) for h, m in ctx.parts if r + h < P]
        recvs = [(tail.new_empty((tail.shape[0], m) + tail.shape[2:]), r - h) for h, m in ctx.parts if r - h >= 0]
        comm_stats.batch_isend_irecv(sends, recvs, group, layer=label, direction="forward")
        return torch.cat([t for t, _ in reversed(recvs)], dim=1) if recvs else tail[:, :0].clone()

    @staticmethod
    def backward(ctx, grad):
        r, P = ctx.r, ctx.P
        sources = [(h, m) for h, m in reversed(ctx.parts) if r - h >= 0]  # the halo's pieces, oldest rows first
        pieces = grad.split([m for _, m in sources], dim=1)
        sends = [(p.contiguous(), r - h) for p, (h, _) in zip(pieces, sources)]
        recvs = [(grad.new_empty((grad.shape[0], m) + grad.shape[2:]), r + h) for h, m in ctx.parts if r + h < P]
        comm_stats.batch_isend_irecv(sends, recvs, ctx.group, layer=ctx.label, direction="backward")
        n = ctx.parts[0][1]
        d_tail = grad.new_zeros((grad.shape[0], n) + grad.shape[2:])
        for g, _ in recvs:  # in hop order: a fixed summation order
            d_tail[:, n - g.shape[1]:] += g
        return d_tail, None, None, None, None, None


def exchange_halo(tail: torch.Tensor, rows: int, local_len: int, group, layer, kind: str) -> torch.Tensor:
    """The up-to-``rows`` rows of the global sequence that precede this shard; ``tail`` ``[B, min(rows, L), ...]``
    is the end of the local shard."""
    return _exchange(layer, lambda cached: _Halo.apply(tail, rows, local_len, group, cp_label(layer, kind), cached))


# --------------------------------------------------------------------------------------------------- data path
SHARDED_KEYS = ("tokens", "labels", "loss_mask", "position_ids")


def shard_batch_for_cp(batch: dict, cp_group=None, *, seq_dim: int = 1) -> dict:
    """This CP rank's contiguous slice ``[r L, (r+1) L)`` of every ``[b, s]`` tensor in ``batch`` (tokens, labels,
    loss_mask, position_ids, ...; None values and non-tensors pass through). Position ids keep their global values;
    if the batch has none, global ``position_ids`` are added. ``cp_group`` defaults to Megatron's CP group."""
    if cp_group is None:
        from megatron.core import parallel_state

        cp_group = parallel_state.get_context_parallel_group()
    P, r = cp_group.size(), cp_group.rank()
    tokens = batch.get("tokens")
    out = dict(batch)
    if "position_ids" not in batch and tokens is not None:
        pos = torch.arange(tokens.shape[seq_dim], device=tokens.device)
        out["position_ids"] = pos.unsqueeze(0).expand(tokens.shape[0], -1) if tokens.dim() == 2 else pos
    if P == 1:
        return out
    for key, t in out.items():
        if not isinstance(t, torch.Tensor) or key == "attention_mask":
            continue
        s = t.shape[seq_dim]
        if s % P:
            raise ValueError(f"batch['{key}'] has sequence length {s}, not divisible by context_parallel_size ({P}): "
                             f"use a seq_length that is a multiple of {P}")
        L = s // P
        out[key] = t.narrow(seq_dim, r * L, L)
    if out.get("attention_mask") is not None:
        raise ValueError("attention_mask is not supported with context parallelism: BASED layers are causal by "
                         "construction; drop the mask (set it to None)")
    return out


def loss_over_global_tokens(losses: torch.Tensor, loss_mask: torch.Tensor, group=None):
    """Loss normalised by the token count of the whole ``group`` (CP group by default; pass the dp x cp group to
    weight every token of the global batch equally).

    Returns ``(loss, mean)``: ``loss = sum(local losses * mask) * group.size() / global_count`` is what to
    backpropagate: Megatron DDP averages gradients over dp x cp, which turns it into the gradient of
    ``global_sum / global_count``; ``mean`` (detached) is ``global_sum / global_count`` for logging.
    """
    if group is None:
        from megatron.core import parallel_state

        group = parallel_state.get_context_parallel_group()
    mask = loss_mask.to(losses.dtype)
    local_sum = (losses * mask).sum()
    totals = torch.stack([local_sum.detach(), mask.sum()]).to(torch.float64)
    if group.size() > 1:
        comm_stats.all_reduce(totals, group, layer="loss", direction="forward")
    if totals[1] == 0:
        raise ValueError("loss_mask selects no tokens on any rank of the group: nothing to normalise by")
    loss = local_sum * (group.size() / totals[1]).to(losses.dtype)
    return loss, (totals[0] / totals[1]).to(losses.dtype)
