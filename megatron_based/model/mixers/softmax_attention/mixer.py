"""The "A" layer of hybrids: Megatron's ``SelfAttention`` with RoPE on contiguous CP shards and a PyTorch SDPA
core attention (FlashAttention kernels on GPU) for when TransformerEngine is absent."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from megatron.core.models.common.embeddings.rope_utils import apply_rotary_pos_emb
from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear
from megatron.core.transformer.attention import SelfAttention, SelfAttentionSubmodules
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.identity_op import IdentityOp
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.spec_utils import ModuleSpec

import based_kernels

from ...rope import rope_freqs, rope_freqs_at
from .context_parallel import softmax_attention_cp


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
        self.layer_number = layer_number
        self.cp_group = getattr(pg_collection, "cp", None) if pg_collection is not None else None

    def forward(self, query, key, value, attention_mask=None, attn_mask_type=None, attention_bias=None,
                packed_seq_params=None, **_):
        if packed_seq_params is not None:
            raise NotImplementedError("packed sequences are not supported by the SDPA core attention of 'A' layers")
        sq, b, np_, hn = query.shape
        q, k, v = (t.permute(1, 2, 0, 3) for t in (query, key, value))  # [b, heads, s, hn]
        if self.cp_group is not None and self.cp_group.size() > 1:
            o = softmax_attention_cp(q, k, v, scale=self.softmax_scale, cp_group=self.cp_group, layer=self)
        else:
            o = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=self.softmax_scale,
                                               enable_gqa=k.shape[1] != q.shape[1])
        return o.permute(2, 0, 1, 3).reshape(sq, b, np_ * hn)


class SoftmaxAttention(SelfAttention):
    """Megatron ``SelfAttention`` that computes its own RoPE for contiguous context-parallel shards.

    With ``config.rope_fusion`` the training forward splits and rotates q, k (and copies v) in one kernel inside
    ``get_query_key_value_tensors`` (``based_kernels.rope_split_qkv``) and passes no ``rotary_pos_emb`` on, so
    Megatron's forward does not rotate again; generation's prefill and decode steps rotate through the same kernel
    at their per-token positions; otherwise (and where the fused path does not apply: inference
    contexts, packed sequences, q/k norms, gated outputs, query groups split over TP ranks, no-RoPE layers)
    Megatron's split + ``apply_rotary_pos_emb`` runs.

    Satisfies the :class:`~megatron_based.model.mixers.base.Mixer` interface like the BASED mixers; its linear
    layers and core attention are Megatron's ``SelfAttentionSubmodules``."""

    symbol = "A"
    description = "full causal softmax attention (hybrids)"

    @classmethod
    def spec(cls, linear_qkv=ColumnParallelLinear, core_attention=SDPACoreAttention,
             linear_proj=RowParallelLinear) -> ModuleSpec:
        return ModuleSpec(module=cls, params={"attn_mask_type": AttnMaskType.causal},
                          submodules=SelfAttentionSubmodules(linear_qkv=linear_qkv, core_attention=core_attention,
                                                             linear_proj=linear_proj))

    @staticmethod
    def flops_per_token(config, seq_length: int) -> float:
        """Projections, plus causal attention over (T + 1) / 2 keys on average (4 * d_h per key and head)."""
        d, T = config.hidden_size, seq_length
        kv = config.kv_channels * (config.num_query_groups or config.num_attention_heads)
        return 2 * d * (d + 2 * kv) + 2 * d * d + 4 * d * (T + 1) / 2

    @staticmethod
    def parameter_count(config) -> tuple[int, int]:
        d = config.hidden_size
        kv = 2 * (config.num_query_groups or config.num_attention_heads) * config.kv_channels
        return d * (d + kv) + d * d, 0

    @staticmethod
    def activation_width(config) -> int:
        return 4 * config.hidden_size

    @staticmethod
    def released_layout(config) -> None:
        return None  # the released BASED models have no softmax-attention layers

    # While the fused RoPE is on: the first position of this forward's tokens (int), or generation's per-token
    # positions [s, b] (tensor); else None.
    _rope_at = None

    def forward(self, hidden_states, attention_mask=None, rotary_pos_emb=None, **kwargs):
        s = hidden_states.shape[0] * (self.config.tensor_model_parallel_size if self.config.sequence_parallel else 1)
        cp = self.pg_collection.cp
        cp_rank = cp.rank() if cp is not None else 0
        if self._fused_rope_applies(kwargs):
            self._rope_at = cp_rank * s
            try:
                return super().forward(hidden_states, attention_mask, rotary_pos_emb=None, **kwargs)
            finally:
                self._rope_at = None
        dim = self.config.kv_channels
        freqs = rope_freqs(s, dim, self.config.rope_base, cp_rank * s, device=hidden_states.device)
        return super().forward(hidden_states, attention_mask, rotary_pos_emb=freqs, **kwargs)

    def _fused_rope_applies(self, kwargs) -> bool:
        c = self.config
        return (c.rope_fusion and not c.no_rope_freq and not c.attention_output_gate and not c.fused_single_qkv_rope
                and c.num_query_groups >= self.world_size
                and all(kwargs.get(name) is None for name in ("inference_context", "inference_params",
                                                              "packed_seq_params"))
                and all(n is None or isinstance(n, IdentityOp) for n in (self.q_layernorm, self.k_layernorm)))

    def get_query_key_value_tensors(self, hidden_states, key_value_states=None, output_gate=False, split_qkv=True):
        """Megatron's, or under the fused RoPE: q ``[s, b, np, hn]``, k, v ``[s, b, ng, hn]`` with q, k rotated at
        positions ``_rope_at + t`` or ``_rope_at [s, b]`` (the ``[s, b, ng, (np/ng + 2) * hn]`` grouped layout of
        ``linear_qkv``)."""
        if self._rope_at is None:
            return super().get_query_key_value_tensors(hidden_states, key_value_states, output_gate=output_gate,
                                                       split_qkv=split_qkv)
        mixed_qkv, _ = self.linear_qkv(hidden_states)
        at = dict(positions=self._rope_at) if isinstance(self._rope_at, torch.Tensor) else dict(offset=self._rope_at)
        return based_kernels.rope_split_qkv(mixed_qkv, self.num_query_groups_per_partition,
                                            self.hidden_size_per_attention_head, base=self.config.rope_base, **at)

    # Generation (megatron_based.inference.generation): a KV cache of max_length rows per sequence (grows with the
    # sequence, unlike the BASED mixers' states: this is the baseline they are compared with).
    def inference_cache(self, batch: int, dtype: torch.dtype, device, max_length: int | None = None) -> dict:
        """``k, v [b, max_length, query groups, d_h]`` in the activation dtype."""
        if not max_length:
            raise ValueError("softmax attention ('A') layers need a KV cache: pass max_length to the generator")
        shape = (batch, max_length, self.num_query_groups_per_partition, self.hidden_size_per_attention_head)
        return {name: torch.zeros(shape, dtype=dtype, device=device) for name in ("k", "v")}

    def _qkv_at(self, hidden_states, positions):
        """q, k rotated at ``positions [s, b]``, and v: as the training forward rotates (the fused RoPE where it
        applies, else Megatron's split and ``apply_rotary_pos_emb``)."""
        if self._fused_rope_applies({}):
            self._rope_at = positions
            try:
                return self.get_query_key_value_tensors(hidden_states)
            finally:
                self._rope_at = None
        q, k, v = self.get_query_key_value_tensors(hidden_states)
        freqs = rope_freqs_at(positions, q.shape[-1], self.config.rope_base)
        cp_group = self.pg_collection.cp
        return (apply_rotary_pos_emb(q, freqs, self.config, cp_group=cp_group),
                apply_rotary_pos_emb(k, freqs, self.config, cp_group=cp_group), v)

    def _attend(self, q, k, v, mask, causal=False):  # q [b, n, sq, hn], k/v [b, sk, ng, hn] -> [sq, b, d]
        o = F.scaled_dot_product_attention(q, k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask, is_causal=causal,
                                           scale=self.core_attention.softmax_scale,
                                           enable_gqa=k.shape[2] != q.shape[1])
        return self.linear_proj(o.permute(2, 0, 1, 3).flatten(2))

    def prefill(self, hidden_states, cache: dict, prompts):
        """Packed prompts ``[T, 1, d]`` (see ``SlidingWindowAttention.prefill``): causal attention within each
        prompt, K/V written to ``cache`` at their positions. Equal-length prompts run as a batch with
        ``is_causal`` (FlashAttention kernels); ragged ones with a block-diagonal mask."""
        q, k, v = self._qkv_at(hidden_states, prompts.positions[:, None])
        cache["k"][prompts.doc_ids, prompts.positions] = k[:, 0]
        cache["v"][prompts.doc_ids, prompts.positions] = v[:, 0]
        if prompts.equal_length is not None:
            b, P = len(prompts.lengths), prompts.equal_length
            out, bias = self._attend(q.view(b, P, *q.shape[2:]).transpose(1, 2), k.view(b, P, *k.shape[2:]),
                                     v.view(b, P, *v.shape[2:]), None, causal=True)  # out [P, b, d]
            return out.transpose(0, 1).reshape(b * P, 1, -1), bias
        t = torch.arange(q.shape[0], device=q.device)
        mask = (prompts.doc_ids[:, None] == prompts.doc_ids[None, :]) & (t[:, None] >= t[None, :])
        return self._attend(q.permute(1, 2, 0, 3), k.transpose(0, 1), v.transpose(0, 1), mask)

    def step(self, hidden_states, cache: dict, positions, kv_length: int | None = None,
             kv_bucket: int | None = None, **_):
        """One token per sequence at ``positions [b]``. ``kv_length`` (given when every sequence is at position
        ``kv_length - 1``) attends over that many rows without a mask, so SDPA can use FlashAttention. Otherwise
        over the first ``kv_bucket`` rows (None: the whole cache; the caller keeps every position below it) with
        the mask key j <= position of its sequence: fixed shapes, positions used on the device only (no host
        sync, CUDA-graph capturable; the generator captures one step per bucket)."""
        q, k, v = (t[0] for t in self._qkv_at(hidden_states, positions[None]))
        rows = torch.arange(q.shape[0], device=q.device)
        cache["k"][rows, positions] = k
        cache["v"][rows, positions] = v
        if kv_length is not None:
            return self._attend(q[:, :, None], cache["k"][:, :kv_length], cache["v"][:, :kv_length], None)
        keys = cache["k"].shape[1] if kv_bucket is None else kv_bucket
        if not 1 <= keys <= cache["k"].shape[1]:
            raise ValueError(f"kv_bucket {kv_bucket} outside the KV cache of {cache['k'].shape[1]} rows")
        mask = (torch.arange(keys, device=q.device) <= positions[:, None])[:, None, None, :]
        return self._attend(q[:, :, None], cache["k"][:, :keys], cache["v"][:, :keys], mask)
