"""The command-line tools' parsers and entry points, importing neither torch nor Megatron.

``--help`` is answered here, before the tool's module (torch, Megatron) is imported, and every entry point first
filters the third-party warnings we know to be harmless (:func:`quiet_known_warnings`; ``--verbose`` keeps them).
Each tool's ``main`` builds its parser from here too, so ``python -m megatron_based.<tool>`` reads the same.
"""
from __future__ import annotations

import argparse
import importlib
import logging
import os
import re
import sys
import warnings
from typing import Callable, Sequence

# Warnings raised through ``warnings``: (message regex, category, module regex). Each says a fallback we expect on
# machines without TransformerEngine / Apex / CUDA, or a deprecation in code we do not call ourselves.
KNOWN_WARNINGS = [
    (r"Transformer Engine (and Apex )?(is|are) not installed", UserWarning, ""),
    (r"Apex is not installed", UserWarning, ""),
    (r"torch\.distributed is disabled, unavailable or uninitialized, assuming the intent is to (save|load) in a "
     r"single process", UserWarning, ""),
    (r"invalid escape sequence", SyntaxWarning, r".*megatron"),  # megatron's kv_block_allocator.py, compiled once
    (r"full scope is deprecated", UserWarning, ""),  # TransformerConfig's own default cuda_graph_modules="full"
    (r"MimoModelConfig is experimental", UserWarning, ""),  # defined when megatron.core.models is imported
    (r"The argument order of load has been changed", UserWarning, ""),  # Megatron's positional dcp.load call
    # The distributed optimizer's fp32 shards are slices of the parameters (not leaves); its zero_grad reads .grad.
    (r"The \.grad attribute of a Tensor that is not a leaf Tensor", UserWarning, r"megatron\.core\.optimizer"),
]
# Messages Megatron and torch print through ``logging``, by logger name.
KNOWN_LOG_MESSAGES = {
    "megatron.core.models.gpt.gpt_model": r"GPTModel IS DEPRECATED",
    "megatron.core.dist_checkpointing.strategies.torch": r"MCore's async save is deprecated",
    "megatron.core.distributed.distributed_data_parallel": r"full_param_layout not provided",
    "torch.utils.cpp_extension": r"No CUDA runtime is found",
}


class _DropMessage(logging.Filter):
    def __init__(self, pattern: str):
        super().__init__()
        self.pattern = re.compile(pattern)

    def filter(self, record: logging.LogRecord) -> bool:
        return not self.pattern.search(record.getMessage())


def quiet_known_warnings(verbose: bool = False) -> None:
    """Hide the known third-party warnings and log lines (:data:`KNOWN_WARNINGS`, :data:`KNOWN_LOG_MESSAGES`) in
    this process and, through ``PYTHONWARNINGS``, in the Python processes it starts (data-loader and checkpoint
    workers). Any other warning still shows. ``verbose``: change nothing."""
    if verbose:
        return
    for message, category, module in KNOWN_WARNINGS:
        warnings.filterwarnings("ignore", message=message, category=category, module=module)
    for name, pattern in KNOWN_LOG_MESSAGES.items():
        logger = logging.getLogger(name)  # the same object the library gets later from getLogger(__name__)
        if not any(isinstance(f, _DropMessage) for f in logger.filters):
            logger.addFilter(_DropMessage(pattern))
    # PYTHONWARNINGS takes no regex and matches a message's start: the literal beginnings of the messages above.
    inherited = [w for w in os.environ.get("PYTHONWARNINGS", "").split(",") if w]
    for start in ("ignore:Transformer Engine and Apex are not installed", "ignore:Transformer Engine is not installed",
                  "ignore:torch.distributed is disabled"):
        if start not in inherited:
            inherited.append(start)
    os.environ["PYTHONWARNINGS"] = ",".join(inherited)


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows each option's default, except where there is none (None, an off switch, an empty list)."""

    def _get_help_string(self, action):
        if action.default is None or action.default is False or action.default == []:
            return action.help
        return super()._get_help_string(action)


def _parser(prog: str, description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog, description=description, formatter_class=_HelpFormatter)
    p.add_argument("--verbose", action="store_true",
                   help="show the third-party warnings hidden by default (TransformerEngine / Apex fallbacks, "
                        "Megatron deprecations)")
    return p


def train_parser() -> argparse.ArgumentParser:
    ap = _parser("megatron-based-train", "Pretraining entry point: megatron-based-train CONFIG.yaml "
                                         "[section.key=value ...]. Launch several processes with torchrun; see "
                                         "docs/training.md.")
    ap.add_argument("config", help="YAML run config (e.g. configs/tiny.yaml)")
    ap.add_argument("overrides", nargs="*", help="section.key=value, e.g. train.lr=1e-3 data.path=[runs/d/kjv]")
    ap.add_argument("--load", help="checkpoint directory, 'latest' or 'auto' (latest, or fresh if none; = train.load)")
    ap.add_argument("--save", help="checkpoint directory (= train.save)")
    ap.add_argument("--dry-run", action="store_true",
                    help="check the config against the job size and print the plan (parallel layout, batch, memory "
                         "estimate), starting nothing; takes --nnodes, --nproc-per-node and --gpu-memory-gib "
                         "(python -m megatron_based.plan --help)")
    return ap


def preprocess_parser() -> argparse.ArgumentParser:
    ap = _parser("megatron-based-preprocess", "Tokenize text or JSONL documents into Megatron's indexed dataset "
                                              "(.bin/.idx), training a sentencepiece tokenizer unless one is given.")
    ap.add_argument("inputs", nargs="+", help="JSONL (.jsonl/.json) or plain-text files")
    ap.add_argument("--output-prefix", required=True, help="writes PREFIX.bin, PREFIX.idx (and PREFIX.model)")
    ap.add_argument("--tokenizer-model", help="an existing sentencepiece .model (default: train one)")
    ap.add_argument("--vocab-size", type=int, default=1024, help="vocabulary of the trained tokenizer")
    ap.add_argument("--json-key", default="text", help="the text field of JSONL records")
    return ap


def generate_parser() -> argparse.ArgumentParser:
    p = _parser("megatron-based-generate", "Stream a continuation of a prompt from a checkpoint.")
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
    p.add_argument("--cuda-graph", action="store_true", help="capture the decode step in a CUDA graph (GPU)")
    return p


def convert_parser() -> argparse.ArgumentParser:
    p = _parser("megatron-based-convert", "Released BASED weights <-> Megatron per-TP-rank state dicts.")
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
    p = _parser("megatron-based-eval", "Loss and perplexity of a checkpoint on a text file.")
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


def mqar_parser() -> argparse.ArgumentParser:
    p = _parser("megatron-based-mqar", "Train a small model on MQAR (train) or score a checkpoint (eval).")
    p.add_argument("command", choices=["train", "eval"], help="train a model, or score --checkpoint")
    p.add_argument("--vocab-size", type=int, help="tokens of the task [train: 64; eval: the model's]")
    p.add_argument("--seq-len", type=int, help="sequence length [train: 64; eval: the model's]")
    p.add_argument("--num-kv-pairs", type=int, default=4, help="key-value pairs per sequence")
    p.add_argument("--num-examples", type=int, default=1000, help="test examples")
    p.add_argument("--seed", type=int, default=0, help="seed of the data and the initialisation")
    p.add_argument("--pattern", default="CLSC", help="train: layer pattern")
    p.add_argument("--hidden-size", type=int, default=64, help="train: model width")
    p.add_argument("--swa-window", type=int, default=16, help="train: S layers' window")
    p.add_argument("--steps", type=int, default=500, help="train: optimizer steps")
    p.add_argument("--lr", type=float, default=3e-3, help="train: peak learning rate")
    p.add_argument("--save", help="train: write the weights and the model's configuration here (a torch file)")
    p.add_argument("--config", help="eval: YAML whose model: section sets the model (every key train sets); not "
                                    "needed for a checkpoint written by train --save, which carries its model")
    p.add_argument("--checkpoint", help="eval: checkpoint to score")
    return p


def _entry(module: str, parser: Callable[[], argparse.ArgumentParser]) -> Callable[..., int]:
    def main(argv: Sequence[str] | None = None) -> int:
        argv = list(sys.argv[1:] if argv is None else argv)
        quiet_known_warnings("--verbose" in argv)
        if "-h" in argv or "--help" in argv:
            parser().print_help()
            return 0
        return importlib.import_module(f"megatron_based.{module}").main(argv)

    main.__doc__ = f"megatron_based.{module}.main, with --help answered before importing it."
    return main


train = _entry("train", train_parser)
preprocess = _entry("data", preprocess_parser)
generate = _entry("generation", generate_parser)
convert = _entry("convert", convert_parser)
evaluate = _entry("evaluate", eval_parser)
mqar = _entry("mqar", mqar_parser)
