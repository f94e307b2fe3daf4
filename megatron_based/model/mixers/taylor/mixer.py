"""BASED "L" mixer: Taylor (2nd-order) linear attention."""
from __future__ import annotations

from dataclasses import dataclass

import torch
from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear
from megatron.core.transformer import TransformerConfig
from megatron.core.transformer.spec_utils import ModuleSpec

import based_kernels

from ..base import MixerModule, cu_seqlens_of, to_bshd
from ..conversion import Rule, group_heads, one, same, ungroup_heads
from .context_parallel import taylor_attention_cp


@dataclass
class TaylorSubmodules:
    """The linear layers of :class:`TaylorLinearAttention` (classes or ``ModuleSpec``s), like Megatron's
    ``SelfAttentionSubmodules``: swap in TransformerEngine / fp8 linears here."""

    linear_qkv: ModuleSpec | type = ColumnParallelLinear
    linear_proj: ModuleSpec | type = RowParallelLinear


class TaylorLinearAttention(MixerModule):
    """``q = W_q x, k = W_k x`` (d -> H*f), ``v = W_v x`` (d -> H*d_h), causal Taylor linear attention per head,
    ``out: H*d_h -> d``; no biases (based-spec.md, mixer 1).

    The three input projections are one column-parallel linear whose rows are grouped per head,
    ``[q_h (f) | k_h (f) | v_h (d_h)]`` for h = 0..H-1, so a TP rank owns whole heads (checkpoint conversion maps
    the released ``proj_q/proj_k/proj_v``). Heads are split across TP ranks.
    """

    symbol = "L"
    description = "Taylor linear attention"

    @classmethod
    def spec(cls, linear_qkv=ColumnParallelLinear, linear_proj=RowParallelLinear) -> ModuleSpec:
        return ModuleSpec(module=cls, submodules=TaylorSubmodules(linear_qkv=linear_qkv, linear_proj=linear_proj))

    @staticmethod
    def flops_per_token(config, seq_length: int) -> float:
        """Projections, plus the linear recurrence (state update and read): 4 * D * (d_h + 1) per head,
        D = 1 + f + f(f+1)/2 (the symmetric map's state rows, as the kernels compute it)."""
        d, H, f = config.hidden_size, config.linear_attention_heads, config.feature_dim
        dh, D = d // H, based_kernels.taylor_attention.feature_dim(f)
        return 2 * d * H * (2 * f + dh) + 2 * H * dh * d + 4 * H * D * (dh + 1)

    @staticmethod
    def parameter_count(config) -> tuple[int, int]:
        d, H = config.hidden_size, config.linear_attention_heads
        return d * H * (2 * config.feature_dim + d // H) + d * d, 0

    @staticmethod
    def activation_width(config) -> int:
        return 2 * config.linear_attention_heads * config.feature_dim + 2 * config.hidden_size

    @staticmethod
    def released_layout(config) -> list[Rule]:
        """The released ``proj_q / proj_k / proj_v`` fused into ``linear_qkv``, rows grouped per head
        ``[q_h (f) | k_h (f) | v_h (d_h)]``."""
        d, Hl, f = config.hidden_size, config.linear_attention_heads, config.feature_dim
        widths = (f, f, d // Hl)
        m = "self_attention."
        return [
            Rule(m + "linear_qkv.weight", ("mixer.proj_q.weight", "mixer.proj_k.weight", "mixer.proj_v.weight"),
                 lambda q, k, v: group_heads(Hl, (q, k, v)), lambda t: ungroup_heads(Hl, widths, t), 0,
                 shapes=((Hl * f, d), (Hl * f, d), (d, d))),
            Rule(m + "linear_proj.weight", ("mixer.out_proj.weight",), same, one, 1, shapes=((d, d),)),
        ]

    def __init__(self, config: TransformerConfig, layer_number: int = 1, pg_collection=None,
                 submodules: TaylorSubmodules | None = None, **injected):
        super().__init__(config, layer_number, pg_collection, **injected)
        submodules = submodules or TaylorSubmodules()
        H = config.linear_attention_heads
        self.feature_dim = config.feature_dim
        self.head_dim = config.hidden_size // H
        self.heads = H // self.tp_size
        width = 2 * self.feature_dim + self.head_dim
        self.linear_qkv = self.column_parallel(submodules.linear_qkv, config.hidden_size, H * width,
                                               tp_comm_buffer_name="qkv")
        self.linear_proj = self.row_parallel(submodules.linear_proj, H * self.head_dim, config.hidden_size,
                                             tp_comm_buffer_name="proj")

    def forward(self, hidden_states: torch.Tensor, attention_mask=None, packed_seq_params=None, **_):
        """hidden_states ``[s, b, d]`` (``[s/tp, b, d]`` under sequence parallel) -> ``(out [s, b, d], None)``."""
        q, k, v = self.project_qkv(hidden_states)
        s, b = q.shape[:2]
        y = self.attend(to_bshd(q), to_bshd(k), to_bshd(v), cu_seqlens_of(packed_seq_params))
        return self.linear_proj(to_bshd(y).reshape(s, b, self.heads * self.head_dim))

    def project_qkv(self, hidden_states):
        """``[s, b, d]`` -> q, k ``[s, b, heads, f]``, v ``[s, b, heads, d_h]`` (this rank's heads)."""
        qkv, _ = self.linear_qkv(hidden_states)
        s, b = qkv.shape[:2]
        f = self.feature_dim
        return qkv.view(s, b, self.heads, 2 * f + self.head_dim).split([f, f, self.head_dim], dim=-1)

    def attend(self, q, k, v, cu_seqlens):
        """Causal Taylor attention on ``[b, s, heads, *]``; context parallelism passes states between ranks."""
        if self.cp_size > 1:
            return taylor_attention_cp(q, k, v, eps=self.config.linear_attention_eps, cp_group=self.cp_group,
                                       cu_seqlens=cu_seqlens, layer=self)
        y, _ = based_kernels.taylor_linear_attention(q, k, v, eps=self.config.linear_attention_eps,
                                                     cu_seqlens=cu_seqlens)
        return y

    # Generation (megatron_based.inference.generation): a constant-size state per sequence, filled by the parallel form.
    def inference_cache(self, batch: int, dtype: torch.dtype, device, max_length: int | None = None) -> dict:
        """``S [b, heads, D, d_h]`` and ``z [b, heads, D]``, D = 1 + f + f(f+1)/2, fp32 (they grow ~linearly in
        t), and the decode buffer (``based_kernels.taylor_attention.ops.STEP_BUFFER`` = C tokens; none at 0): the
        last tokens' raw keys ``kb [b, heads, C, f]`` and values ``vb [b, heads, C, d_h]`` in ``dtype`` and their
        count ``n [b, heads]`` int32, folded into S and z when full, so a step writes the state once every C + 1
        tokens; with ``ops.STEP_READ_COPY`` (off by default) and 16-bit activations also ``sq [b, heads, f(f+1)/2,
        d_h]``, the quadratic rows of S in ``dtype``, which the steps between folds read
        (based_kernels/taylor_attention/README.md, "Decode")."""
        ops = based_kernels.taylor_attention.ops
        f, D = self.feature_dim, based_kernels.taylor_attention.feature_dim(self.feature_dim)
        cache = {"S": torch.zeros(batch, self.heads, D, self.head_dim, dtype=torch.float32, device=device),
                 "z": torch.zeros(batch, self.heads, D, dtype=torch.float32, device=device)}
        C = ops.STEP_BUFFER
        if C > 0:
            cache.update(kb=torch.zeros(batch, self.heads, C, f, dtype=dtype, device=device),
                         vb=torch.zeros(batch, self.heads, C, self.head_dim, dtype=dtype, device=device),
                         n=torch.zeros(batch, self.heads, dtype=torch.int32, device=device))
            if ops.STEP_READ_COPY and dtype in (torch.bfloat16, torch.float16):
                cache["sq"] = torch.zeros(batch, self.heads, D - 1 - f, self.head_dim, dtype=dtype, device=device)
        return cache

    def prefill(self, hidden_states, cache: dict, prompts):
        """Packed prompts ``[T, 1, d]`` (documents at ``prompts.cu_seqlens``): the parallel form, keeping each
        prompt's final state in ``cache`` (the decode buffer empty). Returns ``(out, bias)`` like forward."""
        q, k, v = self.project_qkv(hidden_states)
        y, (S, z) = based_kernels.taylor_linear_attention(
            to_bshd(q), to_bshd(k), to_bshd(v), eps=self.config.linear_attention_eps,
            cu_seqlens=prompts.cu_seqlens, output_final_state=True)
        cache["S"].copy_(S)
        cache["z"].copy_(z)
        if "n" in cache:
            cache["n"].zero_()
        if "sq" in cache:
            cache["sq"].copy_(S[:, :, 1 + self.feature_dim:])
        return self.linear_proj(to_bshd(y).reshape(q.shape[0], 1, self.heads * self.head_dim))

    def step(self, hidden_states, cache: dict, positions=None, **_):
        """One token per sequence ``[1, b, d]``: the recurrent form, updating ``cache`` in place."""
        q, k, v = (t[0] for t in self.project_qkv(hidden_states))
        buffer = tuple(cache[key] for key in ("kb", "vb", "n", "sq") if key in cache) or None
        y, _ = based_kernels.taylor_linear_attention_step(q, k, v, (cache["S"], cache["z"]), inplace=True,
                                                          buffer=buffer, eps=self.config.linear_attention_eps)
        return self.linear_proj(y.reshape(1, y.shape[0], self.heads * self.head_dim))
