"""BASED "C" mixer: BaseConv, a gated causal short convolution."""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear
from megatron.core.tensor_parallel.layers import _initialize_affine_weight_cpu
from megatron.core.transformer import TransformerConfig
from megatron.core.transformer.mlp import apply_swiglu_sharded_factory
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.utils import ensure_metadata_has_dp_cp_group, make_sharded_tensors_for_checkpoint

from based_kernels.short_conv import base_conv_packed, base_conv_packed_step

from ..base import MixerModule, cu_seqlens_of, to_bshd
from ..conversion import Rule, one, same
from .context_parallel import base_conv_cp


@dataclass
class BaseConvSubmodules:
    """The linear layers of :class:`BaseConv` (classes or ``ModuleSpec``s). ``linear_in`` is built with
    ``stride=2`` and must return its bias separately (``skip_bias_add``)."""

    linear_in: ModuleSpec | type = ColumnParallelLinear
    linear_out: ModuleSpec | type = RowParallelLinear


class BaseConv(MixerModule):
    """``u = W_in x + b_in`` (d -> 4d), ``u1, u2 = u[:2d], u[2d:]``, ``c = causal depthwise conv_k(u1)``,
    ``y = W_out(SiLU(c) * u2) + b_out`` (2d -> d) (based-spec.md, mixer 3).

    ``linear_in`` is column-parallel with stride 2 (like Megatron's SwiGLU fc1): TP rank r holds matching channel
    slices ``[u1_r | u2_r]``, so the gate multiplies the right channels (its bias slice is ``[b1_r | b2_r]`` too).
    The conv weight is split by channel.

    ``linear_in`` skips its bias add: the packed conv op takes ``u`` and ``b_in`` and adds the bias inside the
    kernel, and its backward writes one ``du`` and ``d b_in`` (no separate bias add, bias-gradient reduction or
    concatenation of du1, du2). Parameters and checkpoints are unchanged.
    """

    symbol = "C"
    description = "BaseConv (gated short convolution)"

    @classmethod
    def spec(cls, linear_in=ColumnParallelLinear, linear_out=RowParallelLinear) -> ModuleSpec:
        return ModuleSpec(module=cls, submodules=BaseConvSubmodules(linear_in=linear_in, linear_out=linear_out))

    @staticmethod
    def flops_per_token(config, seq_length: int) -> float:
        """Projections, plus the depthwise conv (2 * k per channel)."""
        d = config.hidden_size
        return 2 * d * 4 * d + 2 * 2 * d * d + 2 * config.conv_kernel_size * 2 * d

    @staticmethod
    def parameter_count(config) -> tuple[int, int]:
        d = config.hidden_size
        # linear_out's bias is replicated: added once after the reduce
        return d * 4 * d + 4 * d + 2 * d * d + 2 * d * config.conv_kernel_size, d

    @staticmethod
    def activation_width(config) -> int:
        return 8 * config.hidden_size

    @staticmethod
    def released_layout(config) -> list[Rule]:
        """``in_proj`` / ``out_proj`` as they are (``linear_in`` TP-split with stride 2); the released depthwise
        ``Conv1d`` weight ``[2d, 1, k]`` is our ``conv_weight [2d, k]``."""
        d, k = config.hidden_size, config.conv_kernel_size
        m = "self_attention."
        return [
            Rule(m + "linear_in.weight", ("mixer.in_proj.weight",), same, one, 0, 2, shapes=((4 * d, d),)),
            Rule(m + "linear_in.bias", ("mixer.in_proj.bias",), same, one, 0, 2, shapes=((4 * d,),)),
            Rule(m + "conv_weight", ("mixer.conv.conv.weight",), lambda t: t.squeeze(1),
                 lambda t: (t.unsqueeze(1),), 0, shapes=((2 * d, 1, k),)),
            Rule(m + "linear_out.weight", ("mixer.out_proj.weight",), same, one, 1, shapes=((d, 2 * d),)),
            Rule(m + "linear_out.bias", ("mixer.out_proj.bias",), same, one, shapes=((d,),)),
        ]

    def __init__(self, config: TransformerConfig, layer_number: int = 1, pg_collection=None,
                 submodules: BaseConvSubmodules | None = None, **injected):
        super().__init__(config, layer_number, pg_collection, **injected)
        submodules = submodules or BaseConvSubmodules()
        d = config.hidden_size
        self.channels = 2 * d // self.tp_size
        self.kernel_size = config.conv_kernel_size
        # skip_bias_add: returns (u, b_in), the conv op adds b_in (given at construction, where TransformerEngine's
        # linears read it; Megatron's local linear only stores it, so parameters and init are as before)
        self.linear_in = self.column_parallel(submodules.linear_in, d, 4 * d, bias=True, stride=2,
                                              skip_bias_add=True, tp_comm_buffer_name="fc1")
        self.linear_out = self.row_parallel(submodules.linear_out, 2 * d, d, bias=True, tp_comm_buffer_name="fc2")
        device = None if config.use_cpu_initialization else torch.cuda.current_device()
        self.conv_weight = torch.nn.Parameter(
            torch.empty(self.channels, self.kernel_size, dtype=config.params_dtype, device=device))
        # PyTorch's Conv1d default for a depthwise kernel: U(-1/sqrt(k), 1/sqrt(k)).
        bound = 1.0 / math.sqrt(self.kernel_size)
        init = lambda w: torch.nn.init.uniform_(w, -bound, bound)  # noqa: E731
        if config.perform_initialization:
            if config.use_cpu_initialization:  # the full weight, then this rank's channels (TP-invariant)
                _initialize_affine_weight_cpu(self.conv_weight, 2 * d, self.kernel_size, self.channels, 0, init,
                                              params_dtype=config.params_dtype, rank=self.tp_group.rank(),
                                              world_size=self.tp_size)
            else:
                from megatron.core.tensor_parallel.layers import _initialize_affine_weight_gpu

                _initialize_affine_weight_gpu(self.conv_weight, init, partition_dim=0)
        else:
            setattr(self.conv_weight, "tensor_model_parallel", True)
            setattr(self.conv_weight, "partition_dim", 0)
            setattr(self.conv_weight, "partition_stride", 1)

    def forward(self, hidden_states: torch.Tensor, attention_mask=None, packed_seq_params=None, **_):
        """hidden_states ``[s, b, d]`` (``[s/tp, b, d]`` under sequence parallel) -> ``(out, b_out)``."""
        u, bias = self.linear_in(hidden_states)
        y = self.mix(to_bshd(u), bias, cu_seqlens_of(packed_seq_params))
        return self.linear_out(to_bshd(y))

    def mix(self, u, bias, cu_seqlens):
        """u ``[b, s, 2c]`` (the in-projection without its bias ``[2c]``) -> ``[b, s, c]``."""
        if self.cp_size > 1:  # the halo exchange carries u1 + b1: add the bias first (unfused under CP)
            u1, u2 = (u if bias is None else u + bias).chunk(2, dim=-1)
            return base_conv_cp(u1, u2, self.conv_weight, cp_group=self.cp_group, cu_seqlens=cu_seqlens, layer=self)
        y, _ = base_conv_packed(u, self.conv_weight, bias, cu_seqlens=cu_seqlens)
        return y

    # Generation (megatron_based.inference.generation): the conv state is the last k - 1 conv inputs u1 + b1 of each
    # sequence.
    def inference_cache(self, batch: int, dtype: torch.dtype, device, max_length: int | None = None) -> dict:
        """``conv [b, k - 1, channels]`` in the activation dtype."""
        return {"conv": torch.zeros(batch, self.kernel_size - 1, self.channels, dtype=dtype, device=device)}

    def prefill(self, hidden_states, cache: dict, prompts):
        """Packed prompts ``[T, 1, d]`` (documents at ``prompts.cu_seqlens``): the parallel form, keeping each
        prompt's last k - 1 inputs in ``cache``. Returns ``(out, bias)`` like forward."""
        u, bias = self.linear_in(hidden_states)
        y, final = base_conv_packed(to_bshd(u), self.conv_weight, bias, cu_seqlens=prompts.cu_seqlens,
                                    output_final_state=True)
        cache["conv"].copy_(final)
        return self.linear_out(to_bshd(y))

    def step(self, hidden_states, cache: dict, positions=None, **_):
        """One token per sequence ``[1, b, d]``, updating ``cache`` in place (the step kernel writes the new conv
        state over the old one: no copy)."""
        u, bias = self.linear_in(hidden_states)
        y, _ = base_conv_packed_step(u[0], self.conv_weight, cache["conv"], bias, inplace=True)
        return self.linear_out(y.unsqueeze(0))

    def sharded_state_dict(self, prefix="", sharded_offsets=(), metadata=None):
        """Checkpoint with global shapes: ``linear_in`` as two TP-split halves, ``conv_weight`` split by channel,
        so a checkpoint loads at any TP size."""
        metadata = ensure_metadata_has_dp_cp_group(metadata)
        sd = super().sharded_state_dict(prefix, sharded_offsets, metadata)
        own = make_sharded_tensors_for_checkpoint({"conv_weight": self.conv_weight}, prefix, {"conv_weight": 0},
                                                  sharded_offsets, tp_group=self.tp_group,
                                                  dp_cp_group=metadata["dp_cp_group"])
        sd.update(own)
        singleton = metadata.get("singleton_local_shards", False)
        for key in (f"{prefix}linear_in.weight", f"{prefix}linear_in.bias"):
            sd[key] = apply_swiglu_sharded_factory(sd[key], sharded_offsets, singleton, tp_group=self.tp_group,
                                                   dp_group=metadata["dp_cp_group"])
        return sd
