"""Checkpoint-name rules between the authors' released BASED layout and ours (based-spec.md, "Checkpoint layout").

Each mixer's ``released_layout(config)`` returns its :class:`Rule` list (names relative to the layer:
``self_attention.*`` ours, ``mixer.*`` released); ``megatron_based.inference.convert`` adds the norms, the MLP,
the embeddings and the layer prefixes, and does the TP split and merge.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import torch


@dataclass(frozen=True)
class Rule:
    """One tensor of ours (full, TP=1) made from released tensors, and how TP splits it."""

    ours: str
    released: tuple[str, ...]
    to_ours: Callable
    to_released: Callable
    dim: int | None = None  # TP split dimension (None: replicated)
    stride: int = 1  # 2: each rank holds matching slices of the two halves
    shapes: tuple[tuple[int, ...], ...] = ()  # the released tensors' shapes, in the order of ``released``


def same(t):
    return t


def one(t):
    return (t,)


def swap_halves(t):
    a, b = t.chunk(2, dim=0)
    return torch.cat([b, a], dim=0)


def group_heads(heads: int, parts) -> torch.Tensor:
    """``[H * w_i, d]`` blocks -> rows grouped per head ``[p0_h | p1_h | ...]``."""
    return torch.cat([p.reshape(heads, -1, p.shape[-1]) for p in parts], dim=1).reshape(-1, parts[0].shape[-1])


def ungroup_heads(heads: int, widths: Sequence[int], t: torch.Tensor) -> tuple:
    return tuple(p.reshape(-1, t.shape[-1]) for p in t.reshape(heads, sum(widths), t.shape[-1]).split(widths, dim=1))
