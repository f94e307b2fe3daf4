"""Rotary position embeddings for contiguous context-parallel shards.

Megatron's ``RotaryEmbedding`` slices positions for its zig-zag CP layout; BASED layers shard the sequence
contiguously (docs/parallelism.md), so CP rank r's tokens are at global positions [r * s, (r + 1) * s).
"""
from __future__ import annotations

import torch


def rope_freqs(seq_len: int, dim: int, base: float, offset: int = 0, device=None) -> torch.Tensor:
    """Angles for positions ``offset ... offset + seq_len - 1``: ``[seq_len, 1, 1, dim]`` fp32 in Megatron's
    non-interleaved (rotate-half) layout, ready for ``apply_rotary_pos_emb``."""
    return rope_freqs_at(torch.arange(offset, offset + seq_len, device=device)[:, None], dim, base)


def rope_freqs_at(positions: torch.Tensor, dim: int, base: float) -> torch.Tensor:
    """Angles for arbitrary positions ``[s, b]`` (e.g. per-sequence decode positions): ``[s, b, 1, dim]`` fp32,
    bitwise equal to :func:`rope_freqs` at the same positions."""
    inv_freq = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.float32, device=positions.device) / dim))
    freqs = positions.to(torch.float32).unsqueeze(-1) * inv_freq
    return torch.cat([freqs, freqs], dim=-1).unsqueeze(-2)
