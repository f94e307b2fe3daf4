"""The training tools' parsers (``megatron-based-train``, ``megatron-based-preprocess``), importing neither torch nor
Megatron: the console scripts (``megatron_based.cli``) answer ``--help`` from here, and each tool's ``main`` builds
its parser here."""
from __future__ import annotations

import argparse

from ..runtime.cli import base_parser


def train_parser() -> argparse.ArgumentParser:
    ap = base_parser("megatron-based-train", "Pretraining entry point: megatron-based-train CONFIG.yaml "
                                             "[section.key=value ...]. Launch several processes with torchrun; see "
                                             "docs/training.md.")
    ap.add_argument("config", help="YAML run config (e.g. configs/tiny.yaml)")
    ap.add_argument("overrides", nargs="*", help="section.key=value, e.g. train.lr=1e-3 data.path=[runs/d/kjv]")
    ap.add_argument("--load", help="checkpoint directory, 'latest' or 'auto' (latest, or fresh if none; = train.load)")
    ap.add_argument("--save", help="checkpoint directory (= train.save)")
    ap.add_argument("--dry-run", action="store_true",
                    help="check the config against the job size and print the plan (parallel layout, batch, memory "
                         "estimate), starting nothing; takes --nnodes, --nproc-per-node and --gpu-memory-gib "
                         "(python -m megatron_based.training.plan --help)")
    return ap


def preprocess_parser() -> argparse.ArgumentParser:
    ap = base_parser("megatron-based-preprocess", "Tokenize text or JSONL documents into Megatron's indexed "
                                                  "dataset (.bin/.idx), training a sentencepiece tokenizer unless "
                                                  "one is given.")
    ap.add_argument("inputs", nargs="+", help="JSONL (.jsonl/.json) or plain-text files")
    ap.add_argument("--output-prefix", required=True, help="writes PREFIX.bin, PREFIX.idx (and PREFIX.model)")
    ap.add_argument("--tokenizer-model", help="an existing sentencepiece .model (default: train one)")
    ap.add_argument("--vocab-size", type=int, default=1024, help="vocabulary of the trained tokenizer")
    ap.add_argument("--json-key", default="text", help="the text field of JSONL records")
    return ap
