"""Plain-PyTorch causal sliding-window softmax attention: the oracle for the Triton kernels, and the decode step
over a ring buffer (``sliding_window_step_reference``).

Layout ``[B, T, H, D]`` (FlashAttention / fla). ``window`` is the left window: query t attends keys
t - window ... t (window + 1 keys). RoPE is applied by the caller.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .._common import split_varlen

__all__ = ["sliding_window_attention_reference", "sliding_window_step_reference"]


def sliding_window_attention_reference(q, k, v, *, window, scale=None, kv_prefix=None, cu_seqlens=None):
    """Dense masked softmax attention (float64 when the inputs are float64, else float32 internally).

    Args:
        q: ``[B, T, H, D]``; k, v: ``[B, T, H_kv, D]`` with H divisible by H_kv (GQA).
        window: left window (>= 0); key j is visible to query t iff ``t - window <= j <= t``.
        scale: softmax scale, default ``D ** -0.5``.
        kv_prefix: optional ``(k_prefix, v_prefix)`` ``[B, P, H_kv, D]``: rows that precede the sequence
            (the context-parallel halo); they sit at positions -P ... -1.
        cu_seqlens: ``[N + 1]`` document offsets (B = 1); no attention across documents.
    Returns:
        ``[B, T, H, D]`` in ``q.dtype``.
    """
    if cu_seqlens is not None:
        if kv_prefix is not None:
            raise ValueError("kv_prefix and cu_seqlens cannot be combined")

        def one(q, k, v, initial_state=None, output_final_state=False):
            return sliding_window_attention_reference(q, k, v, window=window, scale=scale), None

        return split_varlen(one, cu_seqlens, (q, k, v), None, False)[0]
    if window < 0:
        raise ValueError(f"window must be >= 0, got {window}")
    B, T, H, D = q.shape
    Hkv = k.shape[2]
    if H % Hkv:
        raise ValueError(f"query heads ({H}) must be a multiple of key/value heads ({Hkv})")
    dt = torch.float64 if q.dtype == torch.float64 else torch.float32
    P = 0
    if kv_prefix is not None:
        kp, vp = kv_prefix
        P = kp.shape[1]
        k, v = torch.cat([kp, k], dim=1), torch.cat([vp, v], dim=1)
    scale = D**-0.5 if scale is None else scale
    qh = q.to(dt).transpose(1, 2)  # [B, H, T, D]
    kh = k.to(dt).transpose(1, 2).repeat_interleave(H // Hkv, dim=1)
    vh = v.to(dt).transpose(1, 2).repeat_interleave(H // Hkv, dim=1)
    qpos = torch.arange(T, device=q.device).unsqueeze(1)
    kpos = torch.arange(-P, T, device=q.device).unsqueeze(0)
    visible = (kpos <= qpos) & (kpos >= qpos - window)
    scores = (qh @ kh.transpose(-1, -2)) * scale
    scores = scores.masked_fill(~visible, -math.inf)
    out = torch.softmax(scores, dim=-1) @ vh
    return out.transpose(1, 2).to(q.dtype)


def sliding_window_step_reference(q, k, v, k_cache, v_cache, positions, *, window, scale=None):
    """One decode token per sequence over a ring buffer: what the S mixer's step ran before the fused kernel.

    Writes k, v ``[B, H, D]`` into ``k_cache, v_cache [B, window + 1, H, D]`` (in place) at slot
    ``positions % (window + 1)`` (``positions [B]`` integer, on the device), then attends q ``[B, H, D]`` over the
    slots holding positions ``max(0, p - window) .. p`` (a slot's age ``(p - slot) mod (window + 1)`` at most p)
    with ``F.scaled_dot_product_attention`` and a boolean mask (scale: SDPA's default ``1 / sqrt(D)`` when None).
    Returns o ``[B, H, D]`` in q's dtype.
    """
    b, ring = q.shape[0], window + 1
    rows = torch.arange(b, device=q.device)
    slots = positions % ring
    k_cache[rows, slots] = k
    v_cache[rows, slots] = v
    age = (positions[:, None] - torch.arange(ring, device=q.device)) % ring  # steps since the slot was written
    visible = (age <= positions[:, None])[:, None, None, :]  # the slot holds a position >= 0
    o = F.scaled_dot_product_attention(q[:, :, None], k_cache.transpose(1, 2), v_cache.transpose(1, 2),
                                       attn_mask=visible, scale=scale)
    return o[:, :, 0]
