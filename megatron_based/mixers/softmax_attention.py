"""The "A" layer of hybrids: Megatron's ``SelfAttention`` with RoPE on contiguous CP shards and a PyTorch SDPA
core attention (FlashAttention kernels on GPU) for when TransformerEngine is absent."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from megatron.core.transformer.attention import SelfAttention
from megatron.core.transformer.module import MegatronModule

from ..rope import rope_freqs


class SDPACoreAttention(MegatronModule):
    """Causal softmax attention through ``torch.nn.functional.scaled_dot_product_attention``.

    query ``[sq, b, np, hn]``, key/value ``[sk, b, ng, hn]`` (GQA when ng < np) -> ``[sq, b, np * hn]``.
    Under context parallelism K/V are all-gathered (LASP-2H style) and the causal mask is offset by this rank's
    first position (contiguous shards).
    """

    def __init__(self, config, layer_number=1, attn_mask_type=None, attention_type="self", softmax_scale=None,
                 pg_collection=None, **_injected):
        super().__init__(config=config)
        self.softmax_scale = softmax_scale
        self.cp_group = getattr(pg_collection, "cp", None) if pg_collection is not None else None

    def forward(self, query, key, value, attention_mask=None, attn_mask_type=None, attention_bias=None,
                packed_seq_params=None, **_):
        if packed_seq_params is not None:
            raise NotImplementedError("packed sequences are not supported by the SDPA core attention of 'A' layers")
        sq, b, np_, hn = query.shape
        q, k, v = (t.permute(1, 2, 0, 3) for t in (query, key, value))  # [b, heads, s, hn]
        if self.cp_group is not None and self.cp_group.size() > 1:
            from ..context_parallel import softmax_attention_cp

            o = softmax_attention_cp(q, k, v, scale=self.softmax_scale, cp_group=self.cp_group)
        else:
            o = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=self.softmax_scale,
                                               enable_gqa=k.shape[1] != q.shape[1])
        return o.permute(2, 0, 1, 3).reshape(sq, b, np_ * hn)


class SoftmaxAttention(SelfAttention):
    """Megatron ``SelfAttention`` that computes its own RoPE for contiguous context-parallel shards."""

    def forward(self, hidden_states, attention_mask=None, rotary_pos_emb=None, **kwargs):
        s = hidden_states.shape[0] * (self.config.tensor_model_parallel_size if self.config.sequence_parallel else 1)
        cp = self.pg_collection.cp
        cp_rank = cp.rank() if cp is not None else 0
        dim = self.config.kv_channels
        freqs = rope_freqs(s, dim, self.config.rope_base, cp_rank * s, device=hidden_states.device)
        return super().forward(hidden_states, attention_mask, rotary_pos_emb=freqs, **kwargs)
