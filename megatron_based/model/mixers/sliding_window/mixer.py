"""BASED "S" mixer: sliding-window softmax attention with RoPE."""
from __future__ import annotations

from dataclasses import dataclass

import torch
from megatron.core.models.common.embeddings.rope_utils import apply_rotary_pos_emb
from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear
from megatron.core.transformer import TransformerConfig
from megatron.core.transformer.spec_utils import ModuleSpec

import based_kernels

from ...rope import rope_freqs_at
from ..base import MixerModule, cu_seqlens_of, to_bshd
from ..conversion import Rule, group_heads, one, same, ungroup_heads
from .context_parallel import sliding_window_attention_cp


@dataclass
class SlidingWindowSubmodules:
    """The linear layers of :class:`SlidingWindowAttention` (classes or ``ModuleSpec``s)."""

    linear_qkv: ModuleSpec | type = ColumnParallelLinear
    linear_proj: ModuleSpec | type = RowParallelLinear


class SlidingWindowAttention(MixerModule):
    """MHA over a causal left window (query t sees keys t - window ... t), RoPE on the full head dim (base 10000,
    rotate-half, absolute positions), scale 1/sqrt(d_h), ``Wqkv: d -> 3d`` and ``out: d -> d`` without bias
    (based-spec.md, mixer 2). ``linear_qkv`` rows follow Megatron's per-head ``[q_h | k_h | v_h]`` grouping."""

    symbol = "S"
    description = "sliding-window softmax attention"

    @classmethod
    def spec(cls, linear_qkv=ColumnParallelLinear, linear_proj=RowParallelLinear) -> ModuleSpec:
        return ModuleSpec(module=cls,
                          submodules=SlidingWindowSubmodules(linear_qkv=linear_qkv, linear_proj=linear_proj))

    @staticmethod
    def flops_per_token(config, seq_length: int) -> float:
        """Projections, plus attention over the keys each query sees (4 * d_h per key and head)."""
        d, T, W = config.hidden_size, seq_length, config.swa_window
        keys = sum(min(t + 1, W + 1) for t in range(T)) / T  # mean keys per query, causal window
        return 2 * d * 3 * d + 2 * d * d + 4 * d * keys

    @staticmethod
    def parameter_count(config) -> tuple[int, int]:
        return 4 * config.hidden_size * config.hidden_size, 0

    @staticmethod
    def activation_width(config) -> int:
        return 4 * config.hidden_size

    @staticmethod
    def released_layout(config) -> list[Rule]:
        """The released ``Wqkv`` is ``[all Q | all K | all V]``; ours groups rows per head ``[q_h | k_h | v_h]``."""
        d, H = config.hidden_size, config.num_attention_heads
        m = "self_attention."
        return [
            Rule(m + "linear_qkv.weight", ("mixer.Wqkv.weight",), lambda t: group_heads(H, t.chunk(3, dim=0)),
                 lambda t: (torch.cat(ungroup_heads(H, (d // H,) * 3, t), dim=0),), 0, shapes=((3 * d, d),)),
            Rule(m + "linear_proj.weight", ("mixer.out_proj.weight",), same, one, 1, shapes=((d, d),)),
        ]

    def __init__(self, config: TransformerConfig, layer_number: int = 1, pg_collection=None,
                 submodules: SlidingWindowSubmodules | None = None, **injected):
        super().__init__(config, layer_number, pg_collection, **injected)
        submodules = submodules or SlidingWindowSubmodules()
        H = config.num_attention_heads
        self.head_dim = config.hidden_size // H
        self.heads = H // self.tp_size
        self.window = config.swa_window
        self.linear_qkv = self.column_parallel(submodules.linear_qkv, config.hidden_size, 3 * config.hidden_size,
                                               tp_comm_buffer_name="qkv")
        self.linear_proj = self.row_parallel(submodules.linear_proj, config.hidden_size, config.hidden_size,
                                             tp_comm_buffer_name="proj")

    def forward(self, hidden_states: torch.Tensor, attention_mask=None, packed_seq_params=None, **_):
        """hidden_states ``[s, b, d]`` (``[s/tp, b, d]`` under sequence parallel) -> ``(out [s, b, d], None)``."""
        q, k, v = self.project_qkv(hidden_states)
        s, b = q.shape[:2]
        o = self.attend(to_bshd(q), to_bshd(k), to_bshd(v), cu_seqlens_of(packed_seq_params))
        return self.linear_proj(to_bshd(o).reshape(s, b, self.heads * self.head_dim))

    def project_qkv(self, hidden_states, positions=None):
        """q, k with RoPE at ``positions [s, b]`` and v, each ``[s, b, heads, d_h]``. Default positions: this CP
        rank's contiguous shard of the sequence, global positions [rank * s, (rank + 1) * s). With
        ``config.rope_fusion`` one kernel splits and rotates, at either (contiguous q, k, v; the attention op gets
        them as token-major ``[b, s, h, d]`` views and returns their gradients in that layout, which the fused
        backward reads as they are): generation's prefill and decode steps rotate as the training forward does."""
        qkv, _ = self.linear_qkv(hidden_states)
        s, b = qkv.shape[:2]
        if self.config.rope_fusion:
            at = dict(offset=self.cp_rank * s) if positions is None else dict(positions=positions)
            return based_kernels.rope_split_qkv(qkv, self.heads, self.head_dim, base=self.config.rope_base, **at)
        q, k, v = qkv.view(s, b, self.heads, 3 * self.head_dim).split(self.head_dim, dim=-1)
        if positions is None:
            positions = torch.arange(self.cp_rank * s, (self.cp_rank + 1) * s, device=q.device)[:, None]
        freqs = rope_freqs_at(positions, self.head_dim, self.config.rope_base)
        return (apply_rotary_pos_emb(q, freqs, self.config, cp_group=self.cp_group),
                apply_rotary_pos_emb(k, freqs, self.config, cp_group=self.cp_group), v)

    def attend(self, q, k, v, cu_seqlens):
        if self.cp_size > 1:
            return sliding_window_attention_cp(q, k, v, window=self.window, cp_group=self.cp_group,
                                               cu_seqlens=cu_seqlens, layer=self)
        return based_kernels.sliding_window_attention(q, k, v, window=self.window, cu_seqlens=cu_seqlens)

    # Generation (megatron_based.inference.generation): a ring buffer of the last window + 1 post-RoPE K/V rows;
    # position p lives in slot p % (window + 1).
    def inference_cache(self, batch: int, dtype: torch.dtype, device, max_length: int | None = None) -> dict:
        """``k, v [b, window + 1, heads, d_h]`` in the activation dtype."""
        shape = (batch, self.window + 1, self.heads, self.head_dim)
        return {name: torch.zeros(shape, dtype=dtype, device=device) for name in ("k", "v")}

    def prefill(self, hidden_states, cache: dict, prompts):
        """Packed prompts ``[T, 1, d]``: ``prompts.cu_seqlens`` document offsets, ``prompts.positions [T]`` position
        of each token in its prompt, ``prompts.doc_ids [T]``, ``prompts.lengths [b]``. Attends within each prompt
        and writes each prompt's last window + 1 K/V rows into ``cache``. Returns ``(out, bias)``."""
        q, k, v = self.project_qkv(hidden_states, prompts.positions[:, None])
        o = based_kernels.sliding_window_attention(to_bshd(q), to_bshd(k), to_bshd(v), window=self.window,
                                                   cu_seqlens=prompts.cu_seqlens)
        keep = prompts.positions >= prompts.lengths[prompts.doc_ids] - (self.window + 1)
        slots = prompts.positions[keep] % (self.window + 1)
        cache["k"][prompts.doc_ids[keep], slots] = k[keep, 0]
        cache["v"][prompts.doc_ids[keep], slots] = v[keep, 0]
        return self.linear_proj(to_bshd(o).reshape(q.shape[0], 1, self.heads * self.head_dim))

    def step(self, hidden_states, cache: dict, positions, **_):
        """One token per sequence ``[1, b, d]`` at ``positions [b]``: write its K/V into the ring, attend over the
        slots holding positions ``max(0, p - window) ... p`` (scale 1/sqrt(d_h)). In place, no host sync
        (CUDA-graph capturable): one kernel on the GPU (``based_kernels.sliding_window_step``; on CPU its torch
        reference, the index_put + masked SDPA this step ran before)."""
        q, k, v = (t[0] for t in self.project_qkv(hidden_states, positions[None]))
        o = based_kernels.sliding_window_step(q, k, v, cache["k"], cache["v"], positions, window=self.window)
        return self.linear_proj(o.reshape(1, q.shape[0], self.heads * self.head_dim))
