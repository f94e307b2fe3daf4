"""``megatron-based-mqar``'s parser, importing neither torch nor Megatron."""
from __future__ import annotations

import argparse

from ..runtime.cli import base_parser

# The published MQAR models (Zoology / the BASED paper): layer 0 Zoology's BaseConv with a short convolution of
# kernel 3 (Z; the layer 0 of Zoology's figure-2 BASED hybrid), layer 1 the sequence mixer under test; BaseConv-only:
# Zoology's figure-2 model, its BaseConv with the short convolution (Z) then with a long implicit one (H).
# baseconv-fig2: that BaseConv-only model as Zoology's code built it when the published figure-2 runs were made
# (October-November 2023, docs/mqar.md "Which model the published BaseConv numbers come from"): 4 blocks, kernel
# sizes [3, -1, 3, -1], and each block's "state mixer" a second instance of its sequence mixer, so 8 BaseConv mixers
# ZZ HH ZZ HH; each is a pre-norm residual layer here, as in Zoology's block.
MODELS = {"attention": "ZA", "baseconv": "ZH", "baseconv-fig2": "ZZHHZZHH", "baseconv-fig2-explicit": "ZZEEZZEE",
          "based": "ZL"}


def mqar_parser() -> argparse.ArgumentParser:
    p = base_parser("megatron-based-mqar", "Train a model on MQAR (train) or score a checkpoint (eval). The defaults "
                                           "are the published setting (docs/mqar.md).")
    p.add_argument("command", choices=["train", "eval"], help="train a model, or score --checkpoint")
    task = p.add_argument_group("task (Zoology's MQAR)")
    task.add_argument("--vocab-size", type=int, help="tokens of the task [train: 8192; eval: the model's]")
    task.add_argument("--seq-len", type=int, help="sequence length [train: 256; eval: the model's]")
    task.add_argument("--num-kv-pairs", type=int, default=16, help="key-value pairs per sequence")
    task.add_argument("--power-a", type=float, default=0.01,
                      help="query slots drawn with p(i) ∝ i^(a-1) (1: uniform)")
    task.add_argument("--random-fill", action="store_true",
                      help="filler tokens uniform over the vocabulary instead of 0 (Zoology's random_non_queries)")
    task.add_argument("--num-train", type=int, default=100_000, help="train: training sequences")
    task.add_argument("--num-examples", type=int, default=3000, help="test sequences")
    task.add_argument("--seed", type=int, default=0,
                      help="seed of the initialisation and the training set (the test set: seed + 10)")
    model = p.add_argument_group("model (train)")
    model.add_argument("--model", choices=sorted(MODELS), default="based",
                       help="the layer pattern (MODELS): attention ZA (Zoology's BaseConv with a short conv of "
                            "kernel 3, then softmax attention), baseconv ZH (that BaseConv, then one with the long "
                            "implicit conv), baseconv-fig2 ZZHHZZHH (the BaseConv-only model as the published "
                            "figure-2 runs built it: 4 blocks of two BaseConv mixers), baseconv-fig2-explicit ZZEEZZEE "
                            "(the same with explicit long filters, implicit_long_conv=False), based ZL (that BaseConv, "
                            "then Taylor linear attention)")
    model.add_argument("--pattern", help="a layer pattern instead of --model's (e.g. CLS)")
    model.add_argument("--hidden-size", type=int, default=64, help="model width d")
    model.add_argument("--feature-dim", type=int, default=16, help="L layers' Taylor feature dimension f")
    model.add_argument("--num-heads", type=int, default=1, help="heads of the L, A and S layers")
    model.add_argument("--swa-window", type=int, default=16, help="S layers' window")
    model.add_argument("--mlp", action="store_true", help="add a SwiGLU MLP to every layer (published: none)")
    model.add_argument("--embed-dropout", type=float, default=0.0,
                       help="dropout on the token embeddings in training (Zoology's embed_dropout; its default 0.1); "
                            "no other dropout")
    opt = p.add_argument_group("training (train)")
    opt.add_argument("--epochs", type=int, default=64, help="passes over the training set")
    opt.add_argument("--early-stop", type=float, default=0.99,
                     help="stop after the first epoch whose test accuracy exceeds this")
    opt.add_argument("--batch-size", type=int, default=256, help="sequences per optimizer step")
    opt.add_argument("--lr", type=float, default=1e-3, help="peak learning rate (cosine-annealed per epoch to 0)")
    opt.add_argument("--weight-decay", type=float, default=0.1, help="AdamW weight decay")
    opt.add_argument("--tf32", action="store_true",
                     help="fp32 matmuls (torch's and the Taylor kernels') on TF32 tensor cores: "
                          "torch.set_float32_matmul_precision('medium') (default: IEEE fp32, as Zoology)")
    opt.add_argument("--no-cuda-graph", dest="cuda_graph", action="store_false",
                     help="train: the plain eager loop on GPU (default: every full batch's step, AdamW included, is "
                          "one CUDA graph replay; the last partial batch of an epoch runs eagerly)")
    opt.add_argument("--json", help="train: write the result (settings, state size, accuracy, per-epoch history)")
    opt.add_argument("--save", help="train: write the weights and the model's configuration here (a torch file)")
    opt.add_argument("--state", help="train: keep the whole training state in this file after every epoch, and "
                                     "continue from it when it exists (a run killed between epochs loses at most "
                                     "one epoch; a finished run's file returns its result)")
    ev = p.add_argument_group("eval")
    ev.add_argument("--config", help="eval: YAML whose model: section sets the model (every key train sets); not "
                                     "needed for a checkpoint written by train --save, which carries its model")
    ev.add_argument("--checkpoint", help="eval: checkpoint to score")
    return p
