"""BASED "S" mixer: sliding-window softmax attention with RoPE."""
from __future__ import annotations

import torch
from megatron.core.models.common.embeddings.rope_utils import apply_rotary_pos_emb

import based_kernels

from ..config import BasedConfig
from ..rope import rope_freqs
from .common import Mixer, cu_seqlens_of, to_bshd


class SlidingWindowAttention(Mixer):
    """MHA over a causal left window (query t sees keys t - window ... t), RoPE on the full head dim (base 10000,
    rotate-half, absolute positions), scale 1/sqrt(d_h), ``Wqkv: d -> 3d`` and ``out: d -> d`` without bias
    (based-spec.md, mixer 2). ``linear_qkv`` rows follow Megatron's per-head ``[q_h | k_h | v_h]`` grouping."""

    def __init__(self, config: BasedConfig, layer_number: int = 1, pg_collection=None, **injected):
        super().__init__(config, layer_number, pg_collection, **injected)
        H = config.num_attention_heads
        self.head_dim = config.hidden_size // H
        self.heads = H // self.tp_size
        self.window = config.swa_window
        self.linear_qkv = self.column_parallel(config.hidden_size, 3 * config.hidden_size)
        self.linear_proj = self.row_parallel(config.hidden_size, config.hidden_size)

    def forward(self, hidden_states: torch.Tensor, attention_mask=None, packed_seq_params=None, **_):
        """hidden_states ``[s, b, d]`` (``[s/tp, b, d]`` under sequence parallel) -> ``(out [s, b, d], None)``."""
        qkv, _ = self.linear_qkv(hidden_states)
        s, b = qkv.shape[:2]
        q, k, v = qkv.view(s, b, self.heads, 3 * self.head_dim).split(self.head_dim, dim=-1)
        # Contiguous CP shards: this rank's tokens sit at global positions [rank * s, (rank + 1) * s).
        freqs = rope_freqs(s, self.head_dim, self.config.rope_base, self.cp_rank * s, device=q.device)
        q = apply_rotary_pos_emb(q, freqs, self.config, cp_group=self.cp_group)
        k = apply_rotary_pos_emb(k, freqs, self.config, cp_group=self.cp_group)
        o = self.attend(to_bshd(q), to_bshd(k), to_bshd(v), cu_seqlens_of(packed_seq_params))
        return self.linear_proj(to_bshd(o).reshape(s, b, self.heads * self.head_dim))

    def attend(self, q, k, v, cu_seqlens):
        if self.cp_size > 1:
            from ..context_parallel import sliding_window_attention_cp

            return sliding_window_attention_cp(q, k, v, window=self.window, cp_group=self.cp_group)
        return based_kernels.sliding_window_attention(q, k, v, window=self.window, cu_seqlens=cu_seqlens)
