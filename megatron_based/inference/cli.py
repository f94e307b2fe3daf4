"""The inference tools' parsers (``megatron-based-generate``, ``-convert``, ``-eval``), importing neither torch nor
Megatron at import time, and ``megatron-based-convert``'s ``main`` (it needs both the conversions and the model
loader, so it lives above :mod:`.convert` and :mod:`.loader`)."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Sequence

from ..runtime.cli import bad_option, base_parser, fail
from ..runtime.noise import quiet_known_warnings


def generate_parser() -> argparse.ArgumentParser:
    p = base_parser("megatron-based-generate", "Stream a continuation of a prompt from a checkpoint.")
    p.add_argument("--config", help="YAML file with the model: section (default: the one saved in a training "
                                     "checkpoint)")
    p.add_argument("--checkpoint", help="Megatron checkpoint dir, torch state dict, or released BASED weights")
    p.add_argument("--random-weights", action="store_true",
                   help="with --config and no --checkpoint: sample from freshly initialised weights (smoke tests)")
    p.add_argument("--tokenizer", required=True, help="sentencepiece .model file, or 'bytes'")
    p.add_argument("--prompt", action="append", required=True, help="repeat for a batch of prompts")
    p.add_argument("--max-new-tokens", type=int, default=128, help="tokens to generate per prompt")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--top-k", type=int, default=0, help="sample from the k most likely tokens, 0 for all")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass, 1.0 for all")
    p.add_argument("--seed", type=int, default=0, help="sampling seed")
    p.add_argument("--dtype", choices=["fp32", "bf16", "fp16"], default="fp32", help="parameter dtype")
    p.add_argument("--tensor-model-parallel-size", type=int, default=1, help="launch with torchrun for TP > 1")
    p.add_argument("--cuda-graph", action="store_true",
                   help="decode through CUDA graphs (GPU; with softmax 'A' layers one per KV-length bucket)")
    return p


def convert_parser() -> argparse.ArgumentParser:
    p = base_parser("megatron-based-convert", "Released BASED weights <-> Megatron per-TP-rank state dicts.")
    p.add_argument("direction", choices=["import", "export"],
                   help="import: released -> Megatron; export: Megatron -> released")
    p.add_argument("--config", required=True, help="YAML file with the model: section (e.g. configs/based-360m.yaml)")
    p.add_argument("--input", required=True, help="import: the released weights as published (pytorch_model.bin) or "
                                                  ".safetensors; export: a training checkpoint "
                                                  "directory, a directory of mp_rank_XX/model.pt, or a TP=1 state "
                                                  "dict file")
    p.add_argument("--output", required=True, help="import: directory for mp_rank_XX/model.pt; export: "
                                                   ".safetensors or torch file")
    p.add_argument("--tensor-model-parallel-size", type=int, default=1, help="import: TP shards to write")
    return p


def eval_parser() -> argparse.ArgumentParser:
    p = base_parser("megatron-based-eval", "Loss and perplexity of a checkpoint on a text file.")
    p.add_argument("--checkpoint", required=True, help="training checkpoint dir, converted dir, or weights file")
    p.add_argument("--config", help="YAML with the model: section (default: the one saved in a training checkpoint)")
    p.add_argument("--tokenizer", required=True, help="sentencepiece .model file, or 'bytes'")
    p.add_argument("--text", required=True, help="UTF-8 text file to score")
    p.add_argument("--seq-length", type=int, help="window length (default: the model's seq_length)")
    p.add_argument("--stride", type=int, help="window step (default: the window length)")
    p.add_argument("--batch-size", type=int, default=8, help="windows per forward")
    p.add_argument("--dtype", choices=["fp32", "bf16", "fp16"], default="fp32", help="parameter dtype")
    p.add_argument("--tensor-model-parallel-size", type=int, default=1, help="launch with torchrun for TP > 1")
    p.add_argument("--json", help="also write the result here")
    return p


def convert_main(argv: Sequence[str] | None = None) -> int:
    """``megatron-based-convert``: released BASED weights <-> Megatron per-TP-rank state dicts."""
    argv = list(sys.argv[1:] if argv is None else argv)
    quiet_known_warnings("--verbose" in argv)
    p = convert_parser()
    args = p.parse_args(argv)
    error = bad_option(args, files=["config"], paths=["input"], positive=["tensor_model_parallel_size"])
    if error is None:
        from ..model.config import ConfigError  # torch and Megatron only now, after the warnings filter
        from ..training.checkpointing import CheckpointError
        from ..training.data import DataError
        from .convert import ConversionError

        try:
            return _convert(args)
        except (ConfigError, ConversionError, CheckpointError, DataError) as e:  # each names its file or key
            error = e
    return fail(p, error)


def _convert(args) -> int:
    import torch

    from ..model.config import model_spec_from_dict, read_model_section
    from ..runtime.parallel import initialize_parallel
    from .convert import megatron_to_released, rank_file, read_tensors, released_to_megatron, write_tensors
    from .loader import load_model

    section = read_model_section(args.config)
    spec = model_spec_from_dict(section)
    kw = dict(vocab_size=spec.vocab_size, make_vocab_size_divisible_by=spec.make_vocab_size_divisible_by)
    if args.direction == "import":
        if section.get("fp32_residual_connection") is False:
            print(f"warning: {args.config} sets fp32_residual_connection: false; the released models were trained "
                  "with the residual stream in fp32 (bf16 runs of these weights will keep it in bf16)",
                  file=sys.stderr)
        shards = released_to_megatron(read_tensors(args.input), spec.config,
                                      tensor_model_parallel_size=args.tensor_model_parallel_size, **kw)
        for r, shard in enumerate(shards):
            write_tensors(shard, rank_file(args.output, r))
        print(f"wrote {len(shards)} TP shard(s) of {len(shards[0])} tensors under {args.output}")
    else:
        src = Path(args.input)
        if src.is_dir() and rank_file(src, 0).is_file():
            n = sum(1 for _ in src.glob("mp_rank_*/model.pt"))
            shards = [read_tensors(rank_file(src, r)) for r in range(n)]
        elif src.is_dir():  # a training checkpoint (dist_checkpointing): load it at TP=1 on this process
            initialize_parallel(1)
            model, _ = load_model(args.config, str(src))
            shards = [{k: v.cpu() for k, v in model.state_dict().items() if isinstance(v, torch.Tensor)}]
        else:
            shards = [read_tensors(src)]
        released = megatron_to_released(shards, spec.config, **kw)
        write_tensors(released, args.output)
        print(f"wrote {len(released)} tensors in the released layout to {args.output}")
    return 0
