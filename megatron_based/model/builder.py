"""Model builder: a Megatron-Core ``GPTModel`` whose decoder is a block of BASED layer specs.

GPTModel is used for its embedding, tied LM head, loss and pipeline plumbing; everything BASED-specific is in the
block spec (see docs/architecture.md for why, and for the path to Megatron's ``HybridModel``). The one override is
the fused cross entropy (``BasedGPTModel.compute_language_model_loss``).
"""
from __future__ import annotations

from typing import Mapping

from megatron.core import parallel_state
from megatron.core.models.gpt import GPTModel
from megatron.core.transformer import TransformerConfig
from torch import Tensor

from based_kernels.cross_entropy import vocab_parallel_cross_entropy

from .config import BasedConfig, as_based_config, padded_vocab_size, uses_long_filter
from .spec import get_based_block_spec


class BasedGPTModel(GPTModel):
    """Megatron's GPTModel; with ``cross_entropy_loss_fusion`` and ``cross_entropy_fusion_impl="triton"`` (the
    defaults of bf16 GPU runs) its loss is ``based_kernels.cross_entropy`` instead of Megatron's fused one, which
    makes fp32 copies of the ``[tokens, V / tp]`` logits (Triton for CUDA logits, the fp32 PyTorch reference
    otherwise)."""

    def compute_language_model_loss(self, labels: Tensor, logits: Tensor) -> Tensor:
        """labels ``[b, s]``, vocab-parallel logits ``[s, b, V / tp]`` -> per-token loss ``[b, s]`` (fp32)."""
        if not (self.config.cross_entropy_loss_fusion and self.config.cross_entropy_fusion_impl == "triton"):
            return super().compute_language_model_loss(labels, logits)
        labels = labels.transpose(0, 1).contiguous()  # [b, s] -> [s, b], as Megatron's
        # The gradient overwrites the logits in place: they come straight from the output layer, whose backward
        # needs its input and weight only, and nothing reads them after the loss's backward.
        loss = vocab_parallel_cross_entropy(logits, labels, self.tp_group, inplace_backward=True)
        return loss.transpose(0, 1).contiguous()  # [s, b] -> [b, s]


def build_model(config: BasedConfig | TransformerConfig, *, vocab_size: int, max_sequence_length: int,
                make_vocab_size_divisible_by: int = 8, pre_process: bool | None = None,
                post_process: bool | None = None, vp_stage: int | None = None, pg_collection=None,
                linears: Mapping[str, Mapping[str, object]] | None = None, mlp: bool = True,
                **based_fields) -> BasedGPTModel:
    """BASED (or hybrid) LM: word embeddings (no learned positions: the S and A mixers apply RoPE themselves, L and
    C need no positions), the layer pattern, final RMSNorm, tied head.

    ``config``: a :class:`BasedConfig`, or a plain Megatron ``TransformerConfig`` plus the BASED fields as keyword
    arguments (``layer_pattern`` required; the rest default as in BasedConfig; see :func:`as_based_config`).
    Megatron's model-parallel groups must exist (``megatron_based.initialize_parallel``) unless ``pg_collection``
    is given. ``vocab_size`` is padded to a multiple of ``make_vocab_size_divisible_by * tp`` (BASED: 50257 ->
    50264). Logits come back vocab-parallel ``[b, s, V / tp]``; with ``labels`` the per-token loss ``[b, s]``.
    ``linears``: per pattern symbol, linear layer classes (or specs) replacing the mixers' defaults, e.g.
    ``{"L": {"linear_qkv": TEColumnParallelLinear, "linear_proj": TERowParallelLinear}}``
    (``megatron_based.model.spec.get_mixer_spec`` names them). ``mlp=False``: layers without an MLP (see
    ``megatron_based.model.spec.get_based_layer_spec``; the MQAR models of Zoology / the BASED paper).
    """
    config = as_based_config(config, **based_fields)
    if not config.long_conv_length and uses_long_filter(config.layer_pattern):
        config.long_conv_length = max_sequence_length  # the H / E mixers' filters cover the whole sequence
    if pg_collection is None and not parallel_state.model_parallel_is_initialized():
        raise RuntimeError("build_model needs Megatron's model-parallel groups: call "
                           "megatron_based.initialize_parallel(tensor_model_parallel_size=...) first (or "
                           "torch.distributed.init_process_group and "
                           "megatron.core.parallel_state.initialize_model_parallel), or pass pg_collection")
    if pre_process is None:
        pre_process = parallel_state.is_pipeline_first_stage(ignore_virtual=False, vp_stage=vp_stage)
    if post_process is None:
        post_process = parallel_state.is_pipeline_last_stage(ignore_virtual=False, vp_stage=vp_stage)
    return BasedGPTModel(
        config=config,
        transformer_layer_spec=get_based_block_spec(config, vp_stage=vp_stage, linears=linears, mlp=mlp),
        vocab_size=padded_vocab_size(vocab_size, make_vocab_size_divisible_by, config.tensor_model_parallel_size),
        max_sequence_length=max_sequence_length,
        pre_process=pre_process,
        post_process=post_process,
        parallel_output=True,
        share_embeddings_and_output_weights=True,
        position_embedding_type="none",
        vp_stage=vp_stage,
        pg_collection=pg_collection,
    )
