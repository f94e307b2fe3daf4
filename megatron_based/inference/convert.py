"""Checkpoint conversion between the released BASED layout and this project's Megatron layout, any TP size.

Released layout (based-spec.md, "Checkpoint layout"): ``transformer.embeddings.word_embeddings``,
``transformer.layers.{i}.norm1 / norm2``, ``.mixer.{in_proj, out_proj, conv.conv}`` (C),
``.mixer.{proj_q, proj_k, proj_v, out_proj}`` (L), ``.mixer.{Wqkv, out_proj}`` (S), ``.mlp.fc1 / fc2``,
``transformer.ln_f``; the LM head is tied.

What differs in ours (``megatron_based.model.build_model``; each mixer's rules are its ``released_layout`` in its
folder under ``megatron_based/model/mixers/``, read here through the mixer registry):

- L ``linear_qkv``: the three projections fused, rows grouped per head ``[q_h (f) | k_h (f) | v_h (d_h)]``;
- S ``linear_qkv``: rows per head ``[q_h | k_h | v_h]`` where the released ``Wqkv`` is ``[all Q | all K | all V]``;
- C ``conv_weight [2d, k]`` where the released depthwise Conv1d weight is ``[2d, 1, k]``;
- MLP ``linear_fc1`` is Megatron's ``[gate | value]`` where the released ``fc1`` output is ``[value | gate]``;
- TP shards: column-parallel weights split by rows (heads stay whole), row-parallel by columns, C ``linear_in``
  and MLP ``linear_fc1`` with stride 2 (rank r holds ``[first-half_r | second-half_r]``), the embedding padded to
  a multiple of ``make_vocab_size_divisible_by * tp`` rows.

The files as published (``pytorch_model.bin`` on the hub) hold the authors' training-wrapper state dict: every name
may start with ``model.``, and beside the weights there are ``*metrics*`` counters (``train_metrics.num-tokens.count``)
and, for configs with ``fixed_decay: True`` (based-1b), the persistent buffer ``transformer.decay.decay`` that no
mixer reads. :func:`published_to_released` strips the prefix and drops those entries, naming them; any other
unknown name stays an error.

Files are read without executing code: safetensors, or torch files with ``weights_only=True``.

Precision: the released models were trained with their residual stream in fp32 (``residual_in_fp32: true``).
Converted weights carry no config; the model they are loaded into takes ``fp32_residual_connection`` from its YAML
``model:`` section (``true`` in configs/based-360m.yaml and based-1.3b.yaml) or, unset, BasedConfig's default (on
for bf16 / fp16 parameters), so imported models run as released. ``megatron-based-convert import`` warns when the
config turns it off.
"""
from __future__ import annotations

import pickle
import sys
from pathlib import Path
from typing import Callable, Sequence

from ..runtime.noise import quiet_known_warnings

if __name__ == "__main__":  # python -m megatron_based.inference.convert: before torch and Megatron warn
    quiet_known_warnings("--verbose" in sys.argv)

import torch  # noqa: E402

from ..model.config import BasedConfig, padded_vocab_size  # noqa: E402
from ..model.mixers.conversion import Rule, one, same, swap_halves  # noqa: E402
from ..model.mixers.registry import MIXERS, get_mixer  # noqa: E402
from ..training.checkpointing import error_line  # noqa: E402

__all__ = ["ConversionError", "published_to_released", "released_to_megatron", "megatron_to_released",
           "released_shapes", "read_tensors", "write_tensors", "rank_file"]


class ConversionError(ValueError):
    """A checkpoint that does not match the model: names the tensor and both shapes."""


def _layer_rules(config: BasedConfig, mixer: str) -> list[Rule]:
    """The rules of one layer: the norms and the MLP here, the mixer's from its ``released_layout``."""
    d, n = config.hidden_size, config.ffn_hidden_size
    rules = [
        Rule("input_layernorm.weight", ("norm1.weight",), same, one, shapes=((d,),)),
        Rule("pre_mlp_layernorm.weight", ("norm2.weight",), same, one, shapes=((d,),)),
        Rule("mlp.linear_fc1.weight", ("mlp.fc1.weight",), swap_halves, lambda t: (swap_halves(t),), 0, 2,
             shapes=((2 * n, d),)),
        Rule("mlp.linear_fc2.weight", ("mlp.fc2.weight",), same, one, 1, shapes=((d, n),)),
    ]
    mixer_rules = get_mixer(mixer).released_layout(config)
    if mixer_rules is None:
        with_layout = [s for s, cls in MIXERS.items() if cls.released_layout(config) is not None]
        raise ConversionError(f"layer type {mixer!r} has no released BASED layout (only {', '.join(with_layout)} "
                              "layers have one)")
    return rules + mixer_rules


def _rules(config: BasedConfig) -> list[Rule]:
    rules = [Rule("embedding.word_embeddings.weight", ("transformer.embeddings.word_embeddings.weight",), same,
                  one, 0),
             Rule("decoder.final_layernorm.weight", ("transformer.ln_f.weight",), same, one)]
    for i, mixer in enumerate(config.layer_pattern):
        for r in _layer_rules(config, mixer):
            rules.append(Rule(f"decoder.layers.{i}.{r.ours}", tuple(f"transformer.layers.{i}.{n}" for n in r.released),
                              r.to_ours, r.to_released, r.dim, r.stride, r.shapes))
    return rules


TIED_HEAD = "lm_head.weight"


def released_shapes(config: BasedConfig, vocab_size: int, make_vocab_size_divisible_by: int = 8) -> dict:
    """Name -> shape of every tensor of the released layout for this config (the LM head is tied, not listed)."""
    d = config.hidden_size
    shapes = {"transformer.embeddings.word_embeddings.weight": (padded_vocab_size(vocab_size,
                                                                                   make_vocab_size_divisible_by), d),
              "transformer.ln_f.weight": (d,)}
    for i, mixer in enumerate(config.layer_pattern):
        try:
            rules = _layer_rules(config, mixer)
        except ConversionError as e:
            raise ConversionError(f"layer {i}: {e}") from None
        for rule in rules:
            shapes.update({f"transformer.layers.{i}.{name}": tuple(s) for name, s in zip(rule.released, rule.shapes)})
    return shapes


def _check_names_and_shapes(tensors: dict, expected: dict, what: str) -> None:
    for name, shape in expected.items():
        if name not in tensors:
            raise ConversionError(f"{what}: tensor {name} is missing (expected shape {tuple(shape)})")
        if tuple(tensors[name].shape) != tuple(shape):
            raise ConversionError(f"{what}: tensor {name} has shape {tuple(tensors[name].shape)}, "
                                  f"expected {tuple(shape)}")
    extra = sorted(set(tensors) - set(expected))
    if extra:
        listed = ", ".join(f"{n} {tuple(tensors[n].shape)}" for n in extra[:5])
        raise ConversionError(f"{what}: {len(extra)} unexpected tensor(s): {listed} (not part of the model "
                              f"described by the config: check layer_pattern and the sizes)")


def _split(t: torch.Tensor, dim: int | None, stride: int, tp: int) -> list[torch.Tensor]:
    if dim is None:
        return [t.clone() for _ in range(tp)]
    if stride == 1:
        return [c.clone() for c in t.chunk(tp, dim=dim)]
    halves = [h.chunk(tp, dim=dim) for h in t.chunk(stride, dim=dim)]
    return [torch.cat([h[r] for h in halves], dim=dim) for r in range(tp)]


def _merge(parts: list[torch.Tensor], dim: int | None, stride: int) -> torch.Tensor:
    if dim is None:
        return parts[0]
    if stride == 1:
        return torch.cat(parts, dim=dim)
    per_rank = [p.chunk(stride, dim=dim) for p in parts]
    return torch.cat([torch.cat([r[s] for r in per_rank], dim=dim) for s in range(stride)], dim=dim)


WRAPPER_PREFIX = "model."  # the authors' training module holds the LM as `.model`
UNUSED_BUFFERS = ("transformer.decay.decay",)  # fixed_decay: True registers it; no BASED mixer reads it


def published_to_released(tensors: dict) -> tuple[dict, list[str]]:
    """A state dict as the authors published it -> the released layout, and the names dropped from it.

    A leading ``model.`` is stripped from every name that has it; entries whose name contains ``metrics`` (training
    counters) and the unused buffers in ``UNUSED_BUFFERS`` are dropped. Names are otherwise left alone, so anything
    else unknown is reported by the shape check of :func:`released_to_megatron`."""
    out, dropped = {}, []
    for name, t in tensors.items():
        short = name[len(WRAPPER_PREFIX):] if name.startswith(WRAPPER_PREFIX) else name
        if "metrics" in short or short in UNUSED_BUFFERS:
            dropped.append(f"{name} {tuple(t.shape)}")
            continue
        if short in out:
            raise ConversionError(f"released checkpoint: {short} is there both with and without the "
                                  f"{WRAPPER_PREFIX!r} prefix; keep one of them")
        out[short] = t
    return out, sorted(dropped)


def released_to_megatron(released: dict, config: BasedConfig, *, vocab_size: int,
                         make_vocab_size_divisible_by: int = 8, tensor_model_parallel_size: int = 1,
                         report: Callable[[str], None] | None = print) -> list[dict]:
    """Released-layout tensors (or a file as published: see :func:`published_to_released`) -> one Megatron model
    state dict per TP rank (``load_state_dict`` ready). ``report`` gets one line naming the dropped entries."""
    released, dropped = published_to_released(released)
    if dropped and report is not None:
        report(f"skipped {len(dropped)} entr{'y' if len(dropped) == 1 else 'ies'} the model does not use: "
               + ", ".join(dropped))
    head = released.pop(TIED_HEAD, None)
    expected = released_shapes(config, vocab_size, make_vocab_size_divisible_by)
    _check_names_and_shapes(released, expected, "released checkpoint")
    emb = released["transformer.embeddings.word_embeddings.weight"]
    if head is not None and not torch.equal(head, emb):
        raise ConversionError(f"released checkpoint: {TIED_HEAD} {tuple(head.shape)} differs from the word "
                              f"embeddings {tuple(emb.shape)}, but BASED ties them")
    tp = tensor_model_parallel_size
    rows = padded_vocab_size(vocab_size, make_vocab_size_divisible_by, tp)
    shards = [{} for _ in range(tp)]
    for rule in _rules(config):
        full = rule.to_ours(*(released[n] for n in rule.released))
        if rule.ours == "embedding.word_embeddings.weight" and rows > full.shape[0]:
            full = torch.cat([full, full.new_zeros(rows - full.shape[0], full.shape[1])])  # padding rows for TP
        for shard, part in zip(shards, _split(full, rule.dim, rule.stride, tp)):
            shard[rule.ours] = part.contiguous()
    return shards


def megatron_to_released(shards: Sequence[dict], config: BasedConfig, *, vocab_size: int,
                         make_vocab_size_divisible_by: int = 8) -> dict:
    """Megatron state dicts of every TP rank (in rank order) -> released-layout tensors (LM head not written:
    it is tied)."""
    tp = len(shards)
    rules = _rules(config)
    rows = padded_vocab_size(vocab_size, make_vocab_size_divisible_by, tp)
    shapes = released_shapes(config, vocab_size, make_vocab_size_divisible_by)
    shards = [{k: v for k, v in shard.items() if not k.endswith("_extra_state")} for shard in shards]
    for r, shard in enumerate(shards):
        expected = {}
        for rule in rules:  # our shapes: the released ones through to_ours and the TP split, on the meta device
            full = rule.to_ours(*(torch.empty(shapes[n], device="meta") for n in rule.released))
            if rule.ours == "embedding.word_embeddings.weight":
                full = torch.empty(rows, full.shape[1], device="meta")
            expected[rule.ours] = _split(full, rule.dim, rule.stride, tp)[r].shape
        _check_names_and_shapes(shard, expected, f"Megatron checkpoint (TP rank {r} of {tp})")
    released = {}
    for rule in rules:
        full = _merge([s[rule.ours] for s in shards], rule.dim, rule.stride)
        if rule.ours == "embedding.word_embeddings.weight":
            full = full[: padded_vocab_size(vocab_size, make_vocab_size_divisible_by)]
        for name, t in zip(rule.released, rule.to_released(full)):
            released[name] = t.contiguous()
    return released


# -- files ---------------------------------------------------------------------------------------------------
def read_tensors(path: str | Path) -> dict:
    """A ``.safetensors`` file, or a torch file read with ``weights_only=True`` (a ``{"model": ...}`` or
    ``{"state_dict": ...}`` wrapper is unwrapped)."""
    path = Path(path)
    if not path.is_file():
        raise ConversionError(f"checkpoint file {path} does not exist")
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return load_file(str(path))
        except SafetensorError as e:
            raise ConversionError(f"checkpoint file {path} is not a readable .safetensors file ({e})") from None
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise ConversionError(f"checkpoint file {path} holds objects other than tensors and plain data; refusing to "
                              f"unpickle it ({error_line(e)})") from None
    except (RuntimeError, OSError) as e:  # a truncated or foreign zip archive
        raise ConversionError(f"checkpoint file {path} is not a readable torch file ({error_line(e)})") from None
    for key in ("model", "state_dict"):
        if isinstance(data, dict) and isinstance(data.get(key), dict):
            data = data[key]
    if not isinstance(data, dict):
        raise ConversionError(f"{path} holds a {type(data).__name__}, not a dict of tensors")
    return {k: v for k, v in data.items() if isinstance(v, torch.Tensor)}


def write_tensors(tensors: dict, path: str | Path) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".safetensors":
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in tensors.items()}, str(path))
    else:
        torch.save(tensors, path)


def rank_file(directory: str | Path, rank: int) -> Path:
    """Where the per-TP-rank Megatron state dicts of a converted checkpoint live."""
    return Path(directory) / f"mp_rank_{rank:02d}" / "model.pt"


if __name__ == "__main__":  # python -m megatron_based.inference.convert: megatron-based-convert's main
    # This file runs as the module __main__ here; convert_main imports megatron_based.inference.convert afresh,
    # which does not import .cli, so the two do not import each other (tests/test_layering.py's cycle check leaves
    # __main__ blocks out).
    from .cli import convert_main

    sys.exit(convert_main())
