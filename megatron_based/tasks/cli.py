"""``megatron-based-mqar``'s parser, importing neither torch nor Megatron."""
from __future__ import annotations

import argparse

from ..runtime.cli import base_parser


def mqar_parser() -> argparse.ArgumentParser:
    p = base_parser("megatron-based-mqar", "Train a small model on MQAR (train) or score a checkpoint (eval).")
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
