"""Model FLOPs per token from the layer pattern (forward; training costs 3x), for TFLOP/s and MFU reports.

Counts the matrix products of every layer (2 FLOPs per multiply-add) and each mixer's sequence mixing at its
algorithmic cost, not at a particular kernel's; each mixer class gives its own count (``flops_per_token``, in its
folder under ``megatron_based/model/mixers/``): Taylor attention as its linear recurrence (state update and read,
4 * D * (d_h + 1) per head, D = 1 + f + f(f+1)/2), sliding-window and softmax attention over the keys each query sees
(4 * d_h per key and head), BaseConv's depthwise conv as 2 * k per channel.
"""
from __future__ import annotations

from .config import BasedConfig
from .mixers.registry import get_mixer


def mixer_flops_per_token(config: BasedConfig, mixer: str, seq_length: int) -> float:
    """Forward FLOPs per token of one mixer (by pattern symbol), from the registry."""
    try:
        cls = get_mixer(mixer)
    except KeyError:
        raise ValueError(f"unknown mixer {mixer!r}") from None
    return cls.flops_per_token(config, seq_length)


def model_flops_per_token(config: BasedConfig, seq_length: int, vocab_size: int) -> float:
    """Forward FLOPs per token of the whole model at sequence length ``seq_length`` (LM head included)."""
    mlp = 2 * config.hidden_size * config.ffn_hidden_size * (3 if config.gated_linear_unit else 2)
    layers = sum(mixer_flops_per_token(config, m, seq_length) + mlp for m in config.layer_pattern)
    return layers + 2 * config.hidden_size * vocab_size
