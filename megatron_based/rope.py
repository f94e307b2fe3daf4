"""Rotary position embeddings for contiguous context-parallel shards.

Megatron's ``RotaryEmbedding`` slices positions for its zig-zag CP layout; BASED layers shard the sequence
contiguously (docs/parallelism.md), so CP rank r's tokens are at global positions [r * s, (r + 1) * s).
"""
from __future__ import annotations

import torch


def rope_freqs(seq_len: int, dim: int, base: float, offset: int = 0, device=None) -> torch.Tensor:
    """Angles for positions ``offset ... offset + seq_len - 1``: ``[seq_len, 1, 1, dim]`` fp32 in Megatron's
    non-interleaved (rotate-half) layout, ready for ``apply_rotary_pos_emb``."""
    inv_freq = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.float32, device=device) / dim))
    pos = torch.arange(offset, offset + seq_len, dtype=torch.float32, device=device)
    freqs = torch.outer(pos, inv_freq)
    return torch.cat([freqs, freqs], dim=-1)[:, None, None, :]
