"""What every BASED mixer is: the :class:`Mixer` interface the registry (``registry.py``) holds, and
:class:`MixerModule`, the base of the L, S and C modules (process groups, spec-built parallel linears, the keyword
arguments Megatron's ``TransformerLayer`` injects into ``self_attention``), plus the ``[s, b, h] <-> [b, s, h]``
views the kernels take.

A mixer is one class (a ``self_attention`` drop-in returning ``(output, bias)``) that also describes itself to
the rest of the project through class-level members, so adding one is a folder and a registry line
(docs/architecture.md, "Adding a mixer"). Softmax attention (Megatron's ``SelfAttention`` subclass) satisfies the
same interface without deriving from :class:`MixerModule`.
"""
from __future__ import annotations

from typing import ClassVar, Protocol, runtime_checkable

import torch
from megatron.core.process_groups_config import ProcessGroupCollection
from megatron.core.transformer import TransformerConfig
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.spec_utils import ModuleSpec, build_module


@runtime_checkable
class Mixer(Protocol):
    """The interface of a mixer class (what ``registry.register_mixer`` checks).

    Class level, read without building the module:

    - ``symbol``: its one-character layer-pattern symbol; ``description``: a few words for error messages.
    - ``spec(**linears)``: the ``self_attention`` ``ModuleSpec``; keyword arguments replace the default linear
      layers (Megatron's local ``ColumnParallelLinear`` / ``RowParallelLinear``) by name, e.g. ``linear_qkv=``.
    - ``flops_per_token(config, seq_length)``: forward model FLOPs of one token (matrix products and mixing).
    - ``parameter_count(config)``: ``(parameters split across TP, parameters replicated on every TP rank)``.
    - ``activation_width(config)``: the width of what backward keeps per token, summed over the mixer's saved
      ``[tokens, width]`` tensors (full, before the TP split), for the dry-run memory estimate.
    - ``released_layout(config)``: the checkpoint-name rules (``conversion.Rule``) between the authors' released
      layout and ours, names relative to the layer; None if the mixer has no released layout.

    Instance level (generation, ``megatron_based.inference.generation``): ``inference_cache`` allocates the
    per-sequence state, ``prefill`` runs packed prompts and fills it, ``step`` decodes one token per sequence in
    place. Context-parallel exchanges are not uniform (state passing, halos, K/V gathers): each mixer's
    ``context_parallel.py`` holds its own, built on the shared pieces of ``megatron_based.model.context_parallel``.
    """

    symbol: ClassVar[str]
    description: ClassVar[str]

    @classmethod
    def spec(cls, **linears) -> ModuleSpec: ...

    @staticmethod
    def flops_per_token(config, seq_length: int) -> float: ...

    @staticmethod
    def parameter_count(config) -> tuple[int, int]: ...

    @staticmethod
    def activation_width(config) -> int: ...

    @staticmethod
    def released_layout(config) -> list | None: ...

    def inference_cache(self, batch: int, dtype: torch.dtype, device, max_length: int | None = None) -> dict: ...

    def prefill(self, hidden_states, cache: dict, prompts): ...

    def step(self, hidden_states, cache: dict, positions=None, **kwargs): ...


MIXER_INTERFACE = ("symbol", "description", "spec", "flops_per_token", "parameter_count", "activation_width",
                   "released_layout", "inference_cache", "prefill", "step")


def missing_interface(cls: type) -> list[str]:
    """The members of :class:`Mixer` that ``cls`` lacks."""
    return [name for name in MIXER_INTERFACE if not hasattr(cls, name)]


class MixerModule(MegatronModule):
    """Base of the L, S and C mixers: a ``self_attention`` drop-in returning ``(output, bias)``.

    Accepts (and ignores where irrelevant) what ``TransformerLayer`` passes: ``layer_number``, ``pg_collection``,
    ``cp_comm_type``, ``attn_mask_type``, ``pp_layer_offset``, ``name`` at construction; ``attention_mask``,
    ``rotary_pos_emb``, ``inference_context``, ``packed_seq_params`` ... at call time. ``submodules`` (the spec's
    dataclass of linear layers) is taken by each subclass.
    """

    @staticmethod
    def released_layout(config) -> list | None:
        return None  # no released BASED layout

    def __init__(self, config: TransformerConfig, layer_number: int = 1,
                 pg_collection: ProcessGroupCollection | None = None, **_injected):
        super().__init__(config=config)
        if pg_collection is None:
            pg_collection = ProcessGroupCollection.use_mpu_process_groups(required_pgs=["tp", "cp"])
        self.pg_collection = pg_collection
        self.tp_group = pg_collection.tp
        self.cp_group = getattr(pg_collection, "cp", None)
        self.tp_size = self.tp_group.size()
        self.layer_number = layer_number

    def column_parallel(self, linear, n_in: int, n_out: int, *, bias: bool = False, stride: int = 1,
                        skip_bias_add: bool = False, tp_comm_buffer_name: str | None = None):
        """An input projection built from ``linear`` (a class or ``ModuleSpec``) with the arguments of Megatron's
        ``SelfAttention.linear_qkv``: N(0, 0.02) init, output split across TP."""
        extra = {} if stride == 1 else {"stride": stride}
        return build_module(linear, n_in, n_out, config=self.config, init_method=self.config.init_method, bias=bias,
                            gather_output=False, skip_bias_add=skip_bias_add, is_expert=False,
                            tp_comm_buffer_name=tp_comm_buffer_name, tp_group=self.tp_group, **extra)

    def row_parallel(self, linear, n_in: int, n_out: int, *, bias: bool = False,
                     tp_comm_buffer_name: str | None = None):
        """Output projection built from ``linear`` like Megatron's ``SelfAttention.linear_proj``:
        N(0, 0.02 / sqrt(2 * num_layers)); a bias is returned, added once after the reduce."""
        return build_module(linear, n_in, n_out, config=self.config, init_method=self.config.output_layer_init_method,
                            bias=bias, input_is_parallel=True, skip_bias_add=True, is_expert=False,
                            tp_comm_buffer_name=tp_comm_buffer_name, tp_group=self.tp_group)

    @property
    def cp_size(self) -> int:
        return 1 if self.cp_group is None else self.cp_group.size()

    @property
    def cp_rank(self) -> int:
        return 0 if self.cp_group is None else self.cp_group.rank()


def to_bshd(t: torch.Tensor) -> torch.Tensor:
    """Megatron's ``[s, b, ...]`` as the kernels' ``[b, s, ...]``: a strided view, no copy."""
    return t.transpose(0, 1)


def cu_seqlens_of(packed_seq_params) -> torch.Tensor | None:
    """Document offsets of a packed (THD) batch, or None."""
    return None if packed_seq_params is None else packed_seq_params.cu_seqlens_q
