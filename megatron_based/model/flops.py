"""Model FLOPs per token from the layer pattern (forward; training costs 3x), for TFLOP/s and MFU reports.

Counts the matrix products of every layer (2 FLOPs per multiply-add) and each mixer's sequence mixing at its
algorithmic cost, not at a particular kernel's: Taylor attention as its linear recurrence (state update and read,
4 * D * (d_h + 1) per head, D = 1 + f + f^2), sliding-window and softmax attention over the keys each query sees
(4 * d_h per key and head), BaseConv's depthwise conv as 2 * k per channel.
"""
from __future__ import annotations

from .config import BasedConfig


def mixer_flops_per_token(config: BasedConfig, mixer: str, seq_length: int) -> float:
    d, T = config.hidden_size, seq_length
    if mixer == "L":
        H, f = config.linear_attention_heads, config.feature_dim
        dh, D = d // H, 1 + f + f * f
        return 2 * d * H * (2 * f + dh) + 2 * H * dh * d + 4 * H * D * (dh + 1)
    if mixer == "S":
        W = config.swa_window
        keys = sum(min(t + 1, W + 1) for t in range(T)) / T  # mean keys per query, causal window
        return 2 * d * 3 * d + 2 * d * d + 4 * d * keys
    if mixer == "C":
        return 2 * d * 4 * d + 2 * 2 * d * d + 2 * config.conv_kernel_size * 2 * d
    if mixer == "A":
        kv = config.kv_channels * (config.num_query_groups or config.num_attention_heads)
        return 2 * d * (d + 2 * kv) + 2 * d * d + 4 * d * (T + 1) / 2
    raise ValueError(f"unknown mixer {mixer!r}")


def model_flops_per_token(config: BasedConfig, seq_length: int, vocab_size: int) -> float:
    """Forward FLOPs per token of the whole model at sequence length ``seq_length`` (LM head included)."""
    mlp = 2 * config.hidden_size * config.ffn_hidden_size * (3 if config.gated_linear_unit else 2)
    layers = sum(mixer_flops_per_token(config, m, seq_length) + mlp for m in config.layer_pattern)
    return layers + 2 * config.hidden_size * vocab_size
