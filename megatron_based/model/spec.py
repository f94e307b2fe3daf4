"""Layer and block specs: BASED mixers plugged into Megatron-Core's ``TransformerLayer`` / ``TransformerBlock``.

A whole BASED model is ``megatron_based.build_model`` (it also sets the tied head and no learned positions). For a
model of your own, hand the block spec to anything that takes a ``TransformerBlock`` spec; ``config`` must be a
``BasedConfig`` (``megatron_based.model.config.as_based_config`` converts a plain ``TransformerConfig``)::

    model = MyModel(config, transformer_layer_spec=get_based_block_spec(config), ...)
"""
from __future__ import annotations

from typing import Mapping

from megatron.core.fusions.fused_bias_dropout import get_bias_dropout_add
from megatron.core.models.backends import LocalSpecProvider
from megatron.core.models.gpt.gpt_layer_specs import get_mlp_module_spec_for_backend
from megatron.core.transformer.identity_op import IdentityFuncOp, IdentityOp
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_block import TransformerBlockSubmodules, get_num_layers_to_build
from megatron.core.transformer.transformer_layer import (
    TransformerLayer,
    TransformerLayerSubmodules,
    get_transformer_layer_offset,
)

from .config import BasedConfig, ConfigError, missing_based_fields, validate_layer_pattern
from .mixers.registry import get_mixer
from .norm import RMSNorm


def get_mixer_spec(mixer: str, **linears) -> ModuleSpec:
    """The ``self_attention`` submodule spec for one pattern symbol (L, S, C, A or a registered mixer's).

    Keyword arguments replace the mixer's default linear layers (Megatron's local ``ColumnParallelLinear`` /
    ``RowParallelLinear``) by submodule name, e.g. ``get_mixer_spec("L", linear_qkv=TEColumnParallelLinear,
    linear_proj=TERowParallelLinear)``; ``linear_in`` / ``linear_out`` for C; ``core_attention`` too for A."""
    validate_layer_pattern(mixer)
    return get_mixer(mixer).spec(**linears)


def get_based_layer_spec(mixer: str, linears: Mapping[str, Mapping[str, object]] | None = None,
                         mlp: bool = True) -> ModuleSpec:
    """A pre-norm ``TransformerLayer``: ``h = x + Mixer(RMSNorm(x)); x' = h + SwiGLU(RMSNorm(h))``.

    ``linears``: per pattern symbol, the linear layers to use instead of the defaults (see :func:`get_mixer_spec`),
    e.g. ``{"L": {"linear_qkv": TEColumnParallelLinear, "linear_proj": TERowParallelLinear}}``.
    ``mlp=False``: no MLP, ``x' = x + Mixer(RMSNorm(x))`` (Megatron's ``IdentityOp`` / ``IdentityFuncOp`` in the MLP
    slots; the synthetic-recall models of Zoology / the BASED paper have none)."""
    return ModuleSpec(
        module=TransformerLayer,
        submodules=TransformerLayerSubmodules(
            input_layernorm=RMSNorm,
            self_attention=get_mixer_spec(mixer, **dict((linears or {}).get(mixer, {}))),
            self_attn_bda=get_bias_dropout_add,
            pre_mlp_layernorm=RMSNorm if mlp else IdentityOp,
            mlp=get_mlp_module_spec_for_backend(LocalSpecProvider()) if mlp else IdentityOp,
            mlp_bda=get_bias_dropout_add if mlp else IdentityFuncOp,
        ),
    )


def get_based_block_spec(config: BasedConfig, layer_pattern: str | None = None, vp_stage: int | None = None,
                         pp_rank: int | None = None,
                         linears: Mapping[str, Mapping[str, object]] | None = None,
                         mlp: bool = True) -> TransformerBlockSubmodules:
    """Per-layer specs for this pipeline stage: the pattern is built for the whole model, then sliced
    ``[offset : offset + num_layers_to_build]`` so every stage gets the right mixer types. ``linears``, ``mlp``:
    see :func:`get_based_layer_spec`."""
    missing = missing_based_fields(config)
    if missing:
        raise ConfigError(f"get_based_block_spec needs a BasedConfig; this {type(config).__name__} lacks the BASED "
                          f"field(s) {', '.join(missing)}: convert it with megatron_based.model.config.as_based_config("
                          "config, layer_pattern=...) or build the whole model with megatron_based.build_model")
    pattern = validate_layer_pattern(layer_pattern or config.layer_pattern, config.num_layers)
    offset = get_transformer_layer_offset(config, vp_stage=vp_stage, pp_rank=pp_rank)
    n = get_num_layers_to_build(config, vp_stage=vp_stage, pp_rank=pp_rank)
    return TransformerBlockSubmodules(layer_specs=[get_based_layer_spec(s, linears, mlp)
                                                   for s in pattern[offset : offset + n]], layer_norm=RMSNorm)
