"""BASED layers for Megatron-LM's own ``pretrain_gpt.py``, through its ``--spec`` flag (no Megatron-LM change).

``pretrain_gpt.py --spec MODULE NAME`` (Megatron-LM paired with megatron-core 0.19: ``gpt_builders.gpt_builder``)
imports ``NAME`` from ``MODULE`` and passes it to ``GPTModel`` as the layer spec *as it is*, with the
``TransformerConfig`` that Megatron-LM built from its arguments; it does not call it. So:

- :data:`based_layer` is the object to name: ``--spec megatron_based.model.megatron_lm based_layer``. It is the
  spec of one layer, which Megatron's ``TransformerBlock`` repeats for every layer of the stage; each
  :class:`BasedPatternLayer` picks its mixer (L, S, C or A) from the layer pattern by its global layer number, so
  pipeline and virtual-pipeline stages get the right mixers.
- :func:`based_layer_spec` ``(args, config, vp_stage=None)`` is the same as a spec function, for training
  frameworks built on Megatron-LM that call the spec with these arguments.

The BASED settings (layer pattern, feature_dim, swa_window, conv_kernel_size, ...) come from the ``model:`` section
of the YAML named by the environment variable ``BASED_SPEC_CONFIG`` (e.g. ``configs/based-360m.yaml``). Megatron-LM's
own flags must describe the same model; a disagreement stops the build with one line naming the flags to change.
The same YAML may carry a top-level ``linears:`` mapping, ``{mixer symbol: {submodule name: "package.module:Class"}}``
(e.g. ``{"L": {"linear_qkv": "megatron.core.extensions.transformer_engine:TEColumnParallelLinear"}}``): the classes
that replace the mixers' default linear layers (``get_based_layer_spec``'s ``linears``); it is checked and imported
when the YAML is first read, before any layer is built. docs/training.md has the full command.
"""
from __future__ import annotations

import importlib
import inspect
import os

import torch
import torch.nn.functional as F
from megatron.core.transformer import TransformerConfig
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_block import TransformerBlockSubmodules, get_num_layers_to_build
from megatron.core.transformer.transformer_layer import TransformerLayer, get_transformer_layer_offset
from megatron.core.utils import get_pg_rank

from .config import (BASED_FIELDS, BasedConfig, ConfigError, ModelSpec, as_based_config, model_section,
                     model_spec_from_dict, read_yaml_file)
from .mixers.registry import MIXERS
from .norm import RMSNorm
from .spec import get_based_layer_spec

__all__ = ["ENV_VAR", "LINEARS_KEY", "BasedPatternLayer", "based_layer", "based_layer_spec",
           "based_config_from_megatron_lm", "linears_from_dict", "yaml_linears"]

ENV_VAR = "BASED_SPEC_CONFIG"

# (Megatron-LM flag, TransformerConfig field): the sizes and the layer architecture BASED fixes. The YAML's value is
# the one to set.
_CONFIG_FLAGS = (("--num-layers", "num_layers"), ("--hidden-size", "hidden_size"),
                 ("--num-attention-heads", "num_attention_heads"), ("--ffn-hidden-size", "ffn_hidden_size"),
                 ("--normalization", "normalization"), ("--norm-epsilon", "layernorm_epsilon"),
                 ("--hidden-dropout", "hidden_dropout"), ("--attention-dropout", "attention_dropout"))
# (Megatron-LM flag, args attribute, required value, flag text to give): what GPTModel takes from args, not config.
_ARG_FLAGS = (("--position-embedding-type", "position_embedding_type", "none", "--position-embedding-type none"),
              ("--untie-embeddings-and-output-weights", "untie_embeddings_and_output_weights", False,
               "no --untie-embeddings-and-output-weights (BASED ties the LM head)"))

# The YAML's top-level key of the linear-layer replacements (beside model:, which every BASED tool reads and which
# rejects keys that are no BasedConfig field).
LINEARS_KEY = "linears"

Linears = dict[str, dict[str, object]]
_yaml_cache: dict[str, tuple[ModelSpec, Linears]] = {}
_config_cache: dict[int, tuple[TransformerConfig, BasedConfig]] = {}


def _import_class(where: str, target) -> object:
    """The class (or ModuleSpec) named ``"package.module:Name"`` or ``"package.module.Name"``; ``where`` names the
    YAML key in the error."""
    if not isinstance(target, str) or not target.strip():
        raise ConfigError(f"{where} is {target!r}: give a class as \"package.module:ClassName\"")
    module, colon, name = target.strip().partition(":")
    if not colon:
        module, _, name = module.rpartition(".")
    if not module or not name:
        raise ConfigError(f"{where} is {target!r}: give a class as \"package.module:ClassName\" or "
                          "\"package.module.ClassName\"")
    try:
        obj = importlib.import_module(module)
    except Exception as e:  # ImportError, or whatever the module raises while importing
        why = f"{type(e).__name__}: {str(e).splitlines()[0]}" if str(e).strip() else type(e).__name__
        raise ConfigError(f"{where}: cannot import module {module!r} ({why}): fix the module path or install "
                          "its package") from None
    for part in name.split("."):
        if not hasattr(obj, part):
            raise ConfigError(f"{where}: module {module!r} has no {name!r}: fix the class name")
        obj = getattr(obj, part)
    if not isinstance(obj, (type, ModuleSpec)):
        raise ConfigError(f"{where}: {target!r} is a {type(obj).__name__}, not a class: name a linear layer class")
    return obj


def linears_from_dict(section, where: str = LINEARS_KEY) -> Linears:
    """``{mixer symbol: {submodule name: class path}}`` (the YAML's ``linears:``) checked against the mixer registry
    and each mixer's ``spec`` arguments, its classes imported: the ``linears`` of ``get_based_layer_spec``."""
    if section is None:
        return {}
    if not isinstance(section, dict):
        raise ConfigError(f"{where} must be a mapping {{mixer symbol: {{submodule: \"package.module:Class\"}}}}, "
                          f"not {type(section).__name__}")
    linears: Linears = {}
    for symbol, submodules in section.items():
        mixer = MIXERS.get(symbol)
        if mixer is None:
            raise ConfigError(f"{where}.{symbol}: no mixer has the symbol {symbol!r}; use one of "
                              f"{', '.join(MIXERS)}")
        names = list(inspect.signature(mixer.spec).parameters)
        if not isinstance(submodules, dict):
            raise ConfigError(f"{where}.{symbol} must be a mapping {{submodule: \"package.module:Class\"}} with "
                              f"submodules among {', '.join(names)}, not {type(submodules).__name__}")
        linears[symbol] = {}
        for name, target in submodules.items():
            if name not in names:
                raise ConfigError(f"{where}.{symbol}.{name}: the {symbol} mixer ({mixer.__name__}) has no submodule "
                                  f"{name!r}; use one of {', '.join(names)}")
            linears[symbol][name] = _import_class(f"{where}.{symbol}.{name}", target)
    return linears


def _yaml_model() -> tuple[str, ModelSpec, Linears]:
    path = os.environ.get(ENV_VAR)
    if not path:
        raise ConfigError(f"{ENV_VAR} is not set: point it at a YAML file with a model: section, e.g. "
                          f"{ENV_VAR}=configs/based-360m.yaml")
    if path not in _yaml_cache:
        if not os.path.isfile(path):
            raise ConfigError(f"{ENV_VAR}={path}: no such file")
        raw = read_yaml_file(path)
        spec = model_spec_from_dict(model_section(raw, f"{ENV_VAR}={path}"))
        try:
            linears = linears_from_dict(raw.get(LINEARS_KEY))
        except ConfigError as e:
            raise ConfigError(f"{ENV_VAR}={path}: {e}") from None
        _yaml_cache[path] = (spec, linears)
    return (path, *_yaml_cache[path])


def yaml_linears() -> Linears:
    """The ``linears:`` of the ``BASED_SPEC_CONFIG`` YAML, imported ({} without the key or the variable)."""
    return _yaml_model()[2] if os.environ.get(ENV_VAR) else {}


def based_config_from_megatron_lm(config: TransformerConfig, args=None) -> BasedConfig:
    """Megatron-LM's ``config`` (and ``args``, when given) checked against the ``BASED_SPEC_CONFIG`` YAML, as the
    :class:`BasedConfig` the BASED layers are built with (the YAML's BASED fields on top of ``config``)."""
    if isinstance(config, BasedConfig):
        return config
    cached = _config_cache.get(id(config))
    if cached is not None and cached[0] is config and args is None:
        return cached[1]
    path, spec, _ = _yaml_model()
    want = spec.config
    wrong = [f"{flag} {getattr(config, field)!r} (the YAML has {getattr(want, field)!r})"
             for flag, field in _CONFIG_FLAGS if getattr(config, field) != getattr(want, field)]
    if not (config.gated_linear_unit and config.activation_func is F.silu):
        wrong.append("--swiglu is not set (BASED's MLP is SwiGLU)")
    if config.add_bias_linear:
        wrong.append("--disable-bias-linear is not set (BASED's linears have no bias)")
    wrong += _final_norm_flags(config)
    if args is not None:
        wrong += [text for _, attr, value, text in _ARG_FLAGS if getattr(args, attr, value) != value]
        divisible = getattr(args, "make_vocab_size_divisible_by", spec.make_vocab_size_divisible_by)
        if divisible != spec.make_vocab_size_divisible_by:
            wrong.append(f"--make-vocab-size-divisible-by {divisible} (the YAML has "
                         f"{spec.make_vocab_size_divisible_by})")
    if wrong:
        raise ConfigError(f"Megatron-LM's arguments disagree with {ENV_VAR}={path}: {'; '.join(wrong)}")
    # Megatron-LM's checkpoint code stacks a block's layers along one layer axis (one tensor per parameter name)
    # unless the config says the layers differ; a BASED pattern's mixers differ in shape (BaseConv, Taylor and
    # window layers' linear_qkv), so its torch_dist checkpoint keeps one entry per layer, as build_model's does
    config.hetereogenous_dist_checkpoint = True
    # fp32_residual_connection follows Megatron-LM's --fp32-residual-connection: its embedding, pipeline dtype and
    # final norm are built from its own config, and the layers' residual must agree with them
    based = as_based_config(config, **{name: getattr(want, name) for name in BASED_FIELDS},
                            fp32_residual_connection=config.fp32_residual_connection)
    _config_cache[id(config)] = (config, based)
    return based


def _final_norm_flags(config: TransformerConfig) -> list[str]:
    """The flags Megatron's own final norm refuses. A layer spec (``based_layer``) leaves the block's final norm to
    Megatron: Transformer Engine's, else apex's, else torch's (``WrappedTorchNorm``), and the last asserts against
    ``persist_layer_norm`` (on by Megatron-LM's default, an apex-kernel option) and sequence parallelism. Found here,
    while the first layer is built, they get a one-line error instead of an assertion from inside Megatron."""
    from megatron.core.transformer import transformer_block
    from megatron.core.transformer.torch_norm import WrappedTorchNorm

    if transformer_block.LayerNormImpl is not WrappedTorchNorm:
        return []
    wrong = []
    if config.persist_layer_norm:
        wrong.append("persist_layer_norm is on (Megatron-LM's default) but neither Transformer Engine nor apex is "
                     "installed, so Megatron's final norm is torch's, which refuses it: add --no-persist-layer-norm")
    if config.sequence_parallel:
        wrong.append("--sequence-parallel needs Transformer Engine or apex for Megatron's final norm (torch's "
                     "refuses it): install one, or leave sequence parallelism off")
    return wrong


class BasedPatternLayer(TransformerLayer):
    """A BASED ``TransformerLayer`` whose mixer is the layer pattern's symbol at its global layer number
    (``layer_number`` is 1-based within the stage, as ``TransformerBlock`` passes it).

    ``megatron_final_norm``: the block's final norm is Megatron's own (``based_layer`` as it is: Megatron adds its
    ``LayerNormImpl``, Transformer Engine's, apex's or torch's). With an fp32 residual stream
    (``--fp32-residual-connection``) and lower-precision parameters those return fp32 for an fp32 input, and the
    output layer's matmul against its bf16 weight fails; so the model's last layer hands the final norm its residual
    in the parameters' dtype (one rounding of the final norm's input, which this project's RMSNorm avoids by norming
    the fp32 residual into that dtype: ``based_layer_spec`` builds the block with it)."""

    def __init__(self, config: TransformerConfig, submodules=None, layer_number: int = 1, vp_stage=None,
                 pg_collection=None, megatron_final_norm: bool = True, **kwargs):
        based = based_config_from_megatron_lm(config)
        pp_rank = get_pg_rank(pg_collection.pp) if pg_collection is not None else None
        index = layer_number - 1 + get_transformer_layer_offset(based, vp_stage, pp_rank)
        spec = get_based_layer_spec(based.layer_pattern[index], yaml_linears())
        super().__init__(based, spec.submodules, layer_number, vp_stage=vp_stage, pg_collection=pg_collection,
                         **kwargs)
        low = based.params_dtype != torch.float32
        last = index == based.num_layers - 1
        self._output_dtype = (based.params_dtype if megatron_final_norm and last and low
                              and based.fp32_residual_connection else None)

    def forward(self, *args, **kwargs):
        hidden, context = super().forward(*args, **kwargs)
        if self._output_dtype is not None:
            hidden = hidden.to(self._output_dtype)
        return hidden, context


# ``--spec megatron_based.model.megatron_lm based_layer``
based_layer = ModuleSpec(module=BasedPatternLayer)


def based_layer_spec(args, config: TransformerConfig, vp_stage: int | None = None) -> TransformerBlockSubmodules:
    """The block spec of this (virtual) pipeline stage, for frameworks that call a spec function with Megatron-LM's
    ``args`` and ``TransformerConfig``; checks both against the ``BASED_SPEC_CONFIG`` YAML first (its ``linears:``
    too: the layers take them from it)."""
    based = based_config_from_megatron_lm(config, args)
    n = get_num_layers_to_build(based, vp_stage=vp_stage)
    layer = ModuleSpec(module=BasedPatternLayer, params={"megatron_final_norm": False})
    return TransformerBlockSubmodules(layer_specs=[layer] * n, layer_norm=RMSNorm)
