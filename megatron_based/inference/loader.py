"""Loading a model for inference, shared by the generate / eval / convert / mqar commands, the demo and the tests.

:func:`load_model` builds the model of a YAML config's ``model:`` section (or of the run configuration a training
checkpoint saved) and loads weights of any kind :func:`load_into_model` reads; :func:`load_for_inference` is its
use for a training checkpoint at the current TP size and the saved precision, with the run's tokenizer.
"""
from __future__ import annotations

from pathlib import Path

import torch
from megatron.core import parallel_state

from ..model.builder import build_model
from ..model.config import ConfigError, model_spec_from_dict, read_model_section
from ..training import checkpointing
from ..training.data import load_tokenizer
from .convert import (WRAPPER_PREFIX, ConversionError, megatron_to_released, rank_file, read_tensors,
                      released_to_megatron)

__all__ = ["load_model", "load_into_model", "load_for_inference", "is_released_layout"]

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def load_model(config_path: str | None, checkpoint: str | None, *, tensor_model_parallel_size: int = 1,
               dtype: str | None = "fp32", **overrides):
    """Build the model of a YAML config's ``model:`` section (default: the run configuration saved in a training
    checkpoint) and load weights from ``checkpoint``: a training (dist_checkpointing) directory, per-rank state
    dicts written by ``megatron-based-convert``, a torch state dict file (read with ``weights_only=True``), or
    released BASED weights (``.safetensors`` / torch file in the released layout, converted on the fly).
    ``dtype``: the parameters' precision (``fp32``, ``bf16``, ``fp16``), or None for the section's own.
    Returns ``(model, ModelSpec)``."""
    if config_path:
        section = read_model_section(config_path)
    elif checkpoint and Path(checkpoint).is_file():
        raise ConfigError(f"{checkpoint} is a weights file, which carries no model configuration: give the config "
                          "(a YAML with its model: section) too")
    elif checkpoint:  # a training checkpoint records its run configuration
        section = checkpointing.saved_run_config(checkpointing.resolve(checkpoint, None))["model"]
    else:
        raise ConfigError("give a config (YAML with a model: section) or a training checkpoint directory")
    # cuda_graph_impl is how a run trained (Megatron's per-layer graphs of forward and backward, which need the
    # training RNG tracker and a GPU); inference builds without it and captures its own decode step (Generator)
    section = {**section, "cuda_graph_impl": "none"}
    if dtype is not None:
        overrides = dict(params_dtype=DTYPES[dtype], bf16=dtype == "bf16", fp16=dtype == "fp16", **overrides)
    spec = model_spec_from_dict(section, tensor_model_parallel_size=tensor_model_parallel_size,
                                use_cpu_initialization=not torch.cuda.is_available(), **overrides)
    if config_path and checkpoint and Path(checkpoint).is_dir() and not rank_file(Path(checkpoint), 0).is_file():
        # a training checkpoint with a config given: another architecture is named before the model is built
        resolved = checkpointing.resolve(checkpoint, None)
        if resolved is not None:
            checkpointing.check_architecture(resolved, spec)
    model = build_model(spec.config, vocab_size=spec.vocab_size, max_sequence_length=spec.seq_length,
                        make_vocab_size_divisible_by=spec.make_vocab_size_divisible_by)
    if torch.cuda.is_available():
        model.cuda()
    if checkpoint:
        load_into_model(model, checkpoint, spec)
    return model.eval(), spec


def load_for_inference(checkpoint: str | Path):
    """Build the model a training checkpoint was trained with (its saved precision), at the current TP size, and
    load its weights. ``initialize_parallel`` must have run. Returns ``(model, ModelSpec, tokenizer)``."""
    path = checkpointing.resolve(str(checkpoint), None)
    if path is None:
        raise checkpointing.CheckpointError(f"no complete checkpoint under {checkpoint}")
    model, spec = load_model(None, str(path), dtype=None,
                             tensor_model_parallel_size=parallel_state.get_tensor_model_parallel_world_size())
    return model, spec, load_tokenizer(checkpointing.saved_run_config(path)["data"]["tokenizer_model"])


def is_released_layout(names) -> bool:
    return any(n.startswith(("transformer.", WRAPPER_PREFIX + "transformer.")) for n in names)


def load_into_model(model, checkpoint: str | Path, spec) -> None:
    """Load weights into a built model: a training checkpoint (``megatron_based.training.checkpointing``), a
    directory of per-rank state dicts (``mp_rank_XX/model.pt``, the TP size must match), or one file with a TP=1
    Megatron state dict or released BASED weights (converted here for this rank)."""
    tp_rank = parallel_state.get_tensor_model_parallel_rank()
    tp = parallel_state.get_tensor_model_parallel_world_size()
    path = Path(checkpoint)
    if path.is_dir() and not rank_file(path, 0).is_file():
        checkpointing.load_checkpoint(checkpointing.resolve(str(path), None), model)
        return
    if path.is_dir():
        if not rank_file(path, tp - 1).is_file() or rank_file(path, tp).is_file():
            raise ConversionError(f"{path} holds per-rank state dicts for another TP size than {tp}: convert it "
                                  f"again with --tensor-model-parallel-size {tp}")
        state = read_tensors(rank_file(path, tp_rank))
    else:
        state = read_tensors(path)
        if is_released_layout(state):
            state = released_to_megatron(state, spec.config, vocab_size=spec.vocab_size,
                                         make_vocab_size_divisible_by=spec.make_vocab_size_divisible_by,
                                         tensor_model_parallel_size=tp,
                                         report=print if tp_rank == 0 else None)[tp_rank]
        elif tp > 1:
            full = megatron_to_released([state], spec.config, vocab_size=spec.vocab_size,
                                        make_vocab_size_divisible_by=spec.make_vocab_size_divisible_by)
            state = released_to_megatron(full, spec.config, vocab_size=spec.vocab_size,
                                         make_vocab_size_divisible_by=spec.make_vocab_size_divisible_by,
                                         tensor_model_parallel_size=tp, report=None)[tp_rank]
    own = model.state_dict()
    for name, t in state.items():
        if name in own and own[name] is not None and tuple(own[name].shape) != tuple(t.shape):
            raise ConversionError(f"checkpoint tensor {name} has shape {tuple(t.shape)}, the model's is "
                                  f"{tuple(own[name].shape)}")
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if not k.endswith("_extra_state")]
    if missing or unexpected:
        raise ConversionError(f"checkpoint {path} does not match the model: missing {missing[:5]}, "
                              f"unexpected {unexpected[:5]}")
