"""What every BASED mixer shares: process groups, Megatron's parallel linears, the [s, b, h] <-> [b, s, h]
views, and the keyword arguments Megatron's ``TransformerLayer`` injects into ``self_attention``."""
from __future__ import annotations

import torch
from megatron.core.process_groups_config import ProcessGroupCollection
from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear
from megatron.core.transformer.module import MegatronModule

from ..config import BasedConfig


class Mixer(MegatronModule):
    """Base of the L, S and C mixers: a ``self_attention`` drop-in returning ``(output, bias)``.

    Accepts (and ignores where irrelevant) what ``TransformerLayer`` passes: ``layer_number``, ``pg_collection``,
    ``cp_comm_type``, ``attn_mask_type``, ``pp_layer_offset``, ``name`` at construction; ``attention_mask``,
    ``rotary_pos_emb``, ``inference_context``, ``packed_seq_params`` ... at call time.
    """

    def __init__(self, config: BasedConfig, layer_number: int = 1, pg_collection: ProcessGroupCollection | None = None,
                 **_injected):
        super().__init__(config=config)
        if pg_collection is None:
            pg_collection = ProcessGroupCollection.use_mpu_process_groups(required_pgs=["tp", "cp"])
        self.pg_collection = pg_collection
        self.tp_group = pg_collection.tp
        self.cp_group = getattr(pg_collection, "cp", None)
        self.tp_size = self.tp_group.size()
        self.layer_number = layer_number

    def column_parallel(self, n_in: int, n_out: int, *, bias: bool = False, stride: int = 1) -> ColumnParallelLinear:
        return ColumnParallelLinear(n_in, n_out, config=self.config, init_method=self.config.init_method, bias=bias,
                                    gather_output=False, skip_bias_add=False, stride=stride, tp_group=self.tp_group)

    def row_parallel(self, n_in: int, n_out: int, *, bias: bool = False) -> RowParallelLinear:
        """Output projection: N(0, 0.02 / sqrt(2 * num_layers)); a bias is returned, added once after the reduce."""
        return RowParallelLinear(n_in, n_out, config=self.config, init_method=self.config.output_layer_init_method,
                                 bias=bias, input_is_parallel=True, skip_bias_add=True, tp_group=self.tp_group)

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
