"""Context parallelism for the BASED mixers on contiguous sequence shards (docs/parallelism.md).

CP rank r of P holds tokens ``[r * L, (r + 1) * L)`` of every sequence (never Megatron's zig-zag layout). Per
layer and direction each mixer issues one collective whose size does not depend on L:

- L (Taylor linear attention): the packed fp32 local state ``phi(K_r)^T [V_r | 1]`` is all-gathered
  asynchronously while rank r runs its local attention with zero initial state (returning the denominator too);
  the exclusive prefix ``S_in = sum_{j<r} S_j`` (fixed order) is then merged exactly into numerator and
  denominator. Backward all-gathers ``G_j = dL/dS_in`` and feeds ``sum_{j>r} G_j`` into the local state's gradient.
- S (sliding-window attention): the last ``window`` post-RoPE K/V rows go to the next rank(s) by P2P and become the
  kernel's ``kv_prefix``; their gradients come back the same way. ``window > L`` uses several hops.
- C (BaseConv): the same halo for the last ``k - 1`` rows of u1, used as the conv's ``initial_state``.
- A (softmax layers of hybrids): K/V all-gathered along the sequence, causal mask offset by ``r * L``;
  gradients reduce-scattered.

Under full activation recompute (``recompute_granularity="full"``) the L, S and C layers keep what they received in
the first forward and reuse it in the recompute: no forward collective is issued twice. All collectives go through
:mod:`megatron_based.runtime.comm_stats`, so tests and benchmarks can count them.

The data path shards batches with :func:`shard_batch_for_cp` and normalises the loss with
:func:`loss_over_global_tokens` (see docs/parallelism.md, "Training with CP").
"""
from __future__ import annotations

from collections import deque

import torch
import torch.nn.functional as F

import based_kernels
from based_kernels.taylor_attention import feature_map

from ..runtime import comm_stats

__all__ = ["taylor_attention_cp", "sliding_window_attention_cp", "base_conv_cp", "softmax_attention_cp",
           "local_state", "shard_batch_for_cp", "loss_over_global_tokens"]

STATE_CHUNK = 2048  # tokens per step of the local-state reduction (bounds the phi(K) temporary)


# ---------------------------------------------------------------------------------------------- recompute cache
def _label(layer, kind: str) -> str:
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


def _check_unpacked(cu_seqlens, kind: str) -> None:
    if cu_seqlens is not None:
        raise NotImplementedError(
            f"packed sequences (cu_seqlens) are not supported with context_parallel_size > 1 in '{kind}' layers: "
            "use unpacked [b, s] batches, or context_parallel_size=1 for packed data")


# -------------------------------------------------------------------------------------------- L: state passing
def local_state(k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """``phi(K)^T [V | 1]`` for k ``[B, T, H, f]``, v ``[B, T, H, d_v]``: ``[B, H, D, d_v + 1]`` in fp32 (fp64 for
    fp64 inputs); the last column is the normalizer ``z``. Reduced over T in chunks of ``STATE_CHUNK`` tokens."""
    dt = torch.promote_types(k.dtype, torch.float32)
    state = None
    for a in range(0, k.shape[1], STATE_CHUNK):
        pk = feature_map(k[:, a:a + STATE_CHUNK].to(dt))
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
        inc = torch.einsum("bthd,bhde->bthe", feature_map(q[:, a:b].to(dt)), s_in)  # [B, t, H, d_v + 1]
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
    _check_unpacked(cu_seqlens, "L")
    if cp_group.size() == 1:
        return based_kernels.taylor_linear_attention(q, k, v, eps=eps)[0]
    label = _label(layer, "L")
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


def _halo(tail: torch.Tensor, rows: int, local_len: int, group, layer, kind: str) -> torch.Tensor:
    """The up-to-``rows`` rows of the global sequence that precede this shard; ``tail`` ``[B, min(rows, L), ...]``
    is the end of the local shard."""
    return _exchange(layer, lambda cached: _Halo.apply(tail, rows, local_len, group, _label(layer, kind), cached))


def sliding_window_attention_cp(q, k, v, *, window, cp_group, cu_seqlens=None, layer=None):
    """Sliding-window attention over a contiguous CP shard: q ``[B, L, H, D]``, post-RoPE k, v ``[B, L, H_kv, D]``
    -> o ``[B, L, H, D]``. K and V travel as one packed halo of ``window`` rows (several hops if window > L)."""
    _check_unpacked(cu_seqlens, "S")
    if cp_group.size() == 1:
        return based_kernels.sliding_window_attention(q, k, v, window=window)
    if window == 0:
        return based_kernels.sliding_window_attention(q, k, v, window=0)
    n = min(window, k.shape[1])
    # Rank 0's halo is empty but still passed: its exchange must stay in the graph to receive rank 1's gradients.
    halo = _halo(torch.cat([k[:, -n:], v[:, -n:]], dim=-1), window, k.shape[1], cp_group, layer, "S")
    k_halo, v_halo = halo.split([k.shape[-1], v.shape[-1]], dim=-1)
    return based_kernels.sliding_window_attention(q, k, v, window=window, kv_prefix=(k_halo, v_halo))


def base_conv_cp(u1, u2, weight, *, cp_group, cu_seqlens=None, layer=None):
    """BaseConv core ``SiLU(causal_conv(u1)) * u2`` over a contiguous CP shard, u1, u2 ``[B, L, C]``: the conv's
    ``initial_state`` is the previous ``k - 1`` rows of u1 (zeros before the sequence start)."""
    _check_unpacked(cu_seqlens, "C")
    rows = weight.shape[1] - 1
    if cp_group.size() == 1 or rows == 0:
        return based_kernels.base_conv(u1, u2, weight)[0]
    L = u1.shape[1]
    halo = _halo(u1[:, L - min(rows, L):], rows, L, cp_group, layer, "C")
    state = F.pad(halo, (0, 0, rows - halo.shape[1], 0))  # zeros before the sequence start
    return based_kernels.base_conv(u1, u2, weight, initial_state=state)[0]


# ---------------------------------------------------------------------------------- A: all-gather K/V (LASP-2H)
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
    kv = _GatherSequence.apply(kv, cp_group, _label(layer, "A"))[: (r + 1) * L].permute(1, 2, 0, 3)
    k_all, v_all = kv.split([k.shape[-1], v.shape[-1]], dim=-1)
    pos = torch.arange((r + 1) * L, device=q.device)
    mask = pos[None, :] <= pos[r * L:, None]
    return F.scaled_dot_product_attention(q, k_all, v_all, attn_mask=mask, scale=scale, enable_gqa=gqa)


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
