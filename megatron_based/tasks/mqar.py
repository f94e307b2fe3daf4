"""Multi-query associative recall (MQAR), the synthetic recall task of the BASED paper (from Zoology).

A sequence starts with ``num_kv_pairs`` key-value pairs ``k1 v1 k2 v2 ...`` (distinct keys from the lower half of
the vocabulary, values from the upper half), then every key is queried once at a random place in the rest of the
sequence, followed by its value; everything else is the noise token 0. The model must predict the value at each
query key: ``labels`` hold the value there and ``IGNORE`` (-100) elsewhere. Chance is ``1 / (number of values)``.

``megatron-based-mqar train`` trains a small model on it and reports recall; ``megatron-based-mqar eval`` scores a
checkpoint. ``benchmarks/mqar.py`` sweeps mixers and sizes for the recall vs state-size trade-off.
"""
from __future__ import annotations

import math
import sys
from dataclasses import dataclass
from typing import Sequence

import torch

from ..inference.generation import Generator
from ..inference.loader import load_model
from ..model.builder import build_model
from ..model.config import BasedConfig, ConfigError
from ..runtime.noise import quiet_known_warnings
from ..runtime.parallel import initialize_parallel
from ..training.logs import progress_bar
from .cli import mqar_parser

IGNORE = -100

__all__ = ["MQARTask", "mqar_batch", "mqar_loss", "evaluate_mqar", "train_mqar", "state_bytes_per_sequence",
           "build_mqar_model", "mqar_model_section", "save_mqar_checkpoint", "load_mqar_checkpoint", "main"]


@dataclass(frozen=True)
class MQARTask:
    vocab_size: int = 64
    seq_len: int = 64
    num_kv_pairs: int = 4

    def __post_init__(self):
        if self.seq_len < 4 * self.num_kv_pairs:
            raise ValueError(f"seq_len ({self.seq_len}) must be >= 4 * num_kv_pairs ({4 * self.num_kv_pairs}): the "
                             "pairs and a query + answer per key must fit")
        if self.vocab_size // 2 - 1 < self.num_kv_pairs:
            raise ValueError(f"vocab_size ({self.vocab_size}) too small for {self.num_kv_pairs} distinct keys: "
                             f"use >= {2 * self.num_kv_pairs + 2}")

    @property
    def num_values(self) -> int:
        return self.vocab_size - self.vocab_size // 2

    @property
    def chance(self) -> float:
        return 1.0 / self.num_values


def mqar_batch(task: MQARTask, num_examples: int, generator: torch.Generator | None = None):
    """``(inputs [N, T], labels [N, T])`` int64; see the module docstring for the layout."""
    N, T, D = num_examples, task.seq_len, task.num_kv_pairs
    half = task.vocab_size // 2
    keys = torch.rand(N, half - 1, generator=generator).argsort(-1)[:, :D] + 1  # distinct keys in [1, half)
    values = torch.randint(half, task.vocab_size, (N, D), generator=generator)
    inputs = torch.zeros(N, T, dtype=torch.long)
    labels = torch.full((N, T), IGNORE, dtype=torch.long)
    inputs[:, 0: 2 * D: 2], inputs[:, 1: 2 * D: 2] = keys, values
    # Queries: D distinct slots among the (T - 2D) // 2 two-token slots after the context, keys in random order.
    slots = torch.rand(N, (T - 2 * D) // 2, generator=generator).argsort(-1)[:, :D]
    pos = 2 * D + 2 * slots  # where each query key goes; its value follows
    order = torch.rand(N, D, generator=generator).argsort(-1)
    qkeys, qvalues = keys.gather(1, order), values.gather(1, order)
    inputs.scatter_(1, pos, qkeys)
    inputs.scatter_(1, pos + 1, qvalues)
    labels.scatter_(1, pos, qvalues)
    return inputs, labels


def mqar_loss(model, inputs: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy over the query positions (Megatron's per-token loss, masked)."""
    mask = labels != IGNORE
    b, T = inputs.shape
    loss = model(inputs, torch.arange(T, device=inputs.device).expand(b, T), attention_mask=None,
                 labels=labels.clamp(min=0))
    return (loss * mask).sum() / mask.sum()


@torch.no_grad()
def evaluate_mqar(model, inputs: torch.Tensor, labels: torch.Tensor, batch_size: int = 64) -> float:
    """Recall: the fraction of queries whose arg-max prediction (over the full vocabulary) is the value."""
    from megatron.core.tensor_parallel import gather_from_tensor_model_parallel_region

    model.eval()
    correct = total = 0
    T = inputs.shape[1]
    for i in range(0, inputs.shape[0], batch_size):
        x, y = inputs[i: i + batch_size], labels[i: i + batch_size]
        logits = model(x, torch.arange(T, device=x.device).expand(x.shape[0], T), attention_mask=None)
        pred = gather_from_tensor_model_parallel_region(logits).argmax(-1)
        mask = y != IGNORE
        correct += int((pred[mask] == y[mask]).sum())
        total += int(mask.sum())
    return correct / total


def train_mqar(model, task: MQARTask, *, steps: int, batch_size: int = 64, lr: float = 3e-3,
               weight_decay: float = 0.1, seed: int = 0, progress: bool = True) -> list[float]:
    """Train on fresh MQAR batches with AdamW and a linear warm-up + cosine schedule; returns the losses.
    ``progress``: a progress bar on a terminal, else a plain line every ``steps // 20`` steps."""
    from rich.console import Console

    console = Console(file=sys.stdout)
    live = progress and console.is_terminal
    every = max(1, steps // 20)
    device = next(model.parameters()).device
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay, betas=(0.9, 0.98))
    warmup = max(1, steps // 10)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps)))
    losses = []
    model.train()
    with progress_bar(live, console) as bar:
        job = bar.add_task("MQAR step", total=steps, stats="")
        for step in range(1, steps + 1):
            x, y = (t.to(device) for t in mqar_batch(task, batch_size, g))
            loss = mqar_loss(model, x, y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            sched.step()
            losses.append(loss.item())
            bar.update(job, advance=1, stats=f"loss {losses[-1]:.3f}")
            if progress and not live and (step % every == 0 or step == steps):
                print(f"MQAR step {step}/{steps}  loss {losses[-1]:.3f}", flush=True)
    model.eval()
    return losses


def state_bytes_per_sequence(model, max_length: int | None = None) -> int:
    """Bytes of decode state one sequence needs (the generation caches; "A" layers at ``max_length``)."""
    gen = Generator(model, max_length=max_length)
    gen.allocate(1)
    return gen.cache_bytes()


def build_mqar_model(pattern: str, *, hidden_size: int, num_heads: int = 4, feature_dim: int = 8,
                     swa_window: int = 16, vocab_size: int = 64, seq_len: int = 64, **overrides):
    """A small BASED (or single-mixer) model for MQAR on this machine's device."""
    config = BasedConfig(layer_pattern=pattern, hidden_size=hidden_size, num_attention_heads=num_heads,
                         feature_dim=feature_dim, swa_window=swa_window,
                         use_cpu_initialization=not torch.cuda.is_available(), **overrides)
    model = build_model(config, vocab_size=vocab_size, max_sequence_length=seq_len)
    return model.cuda() if torch.cuda.is_available() else model


def mqar_model_section(pattern: str, *, hidden_size: int, num_heads: int = 4, feature_dim: int = 8,
                       swa_window: int = 16, vocab_size: int = 64, seq_len: int = 64) -> dict:
    """The YAML ``model:`` section (the key names of configs/*.yaml) of :func:`build_mqar_model`'s model; a saved MQAR
    checkpoint carries it, so ``eval`` rebuilds exactly the model that was trained."""
    return {"layer_pattern": pattern, "hidden_size": hidden_size, "num_attention_heads": num_heads,
            "feature_dim": feature_dim, "swa_window": swa_window, "vocab_size": vocab_size, "seq_length": seq_len}


def required_model_keys(pattern: str) -> list[str]:
    """Keys a YAML ``model:`` section must set for ``pattern``: every one :func:`build_mqar_model` sets, since a default
    would silently build a different model (``swa_window`` only with S layers, ``feature_dim`` only with L)."""
    return [k for k in mqar_model_section(pattern, hidden_size=0)
            if not (k == "swa_window" and "S" not in pattern) and not (k == "feature_dim" and "L" not in pattern)]


def save_mqar_checkpoint(path: str, model, section: dict) -> None:
    """``{"model": section, "state_dict": ...}``, a torch file that ``torch.load(weights_only=True)`` reads."""
    torch.save({"model": dict(section), "state_dict": model.state_dict()}, path)


def load_mqar_checkpoint(checkpoint: str, config: str | None = None):
    """``(model, model section)`` for ``megatron-based-mqar eval``. The model comes from ``config``'s ``model:``
    section when given (it must set every :func:`required_model_keys` key), else from the section the checkpoint
    carries; a checkpoint that carries none (a bare state dict, a training directory) needs ``config``."""
    import os

    section = None
    if config:
        import yaml

        with open(config) as fh:
            section = (yaml.safe_load(fh) or {}).get("model")
        if not section or "layer_pattern" not in section:
            raise ConfigError(f"{config} needs a model: section with layer_pattern")
        missing = [k for k in required_model_keys(section["layer_pattern"]) if k not in section]
        if missing:
            raise ConfigError(f"{config}: the model section lacks {missing}; set them to the trained model's values "
                              "(a default would score a different model), or leave out --config for a checkpoint "
                              "written by `megatron-based-mqar train --save`, which carries its model")
    saved = torch.load(checkpoint, map_location="cpu", weights_only=True) if os.path.isfile(checkpoint) else None
    if isinstance(saved, dict) and set(saved) == {"model", "state_dict"}:
        section = section or saved["model"]
        model = build_mqar_model(section["layer_pattern"], hidden_size=section["hidden_size"],
                                 num_heads=section["num_attention_heads"], feature_dim=section.get("feature_dim", 8),
                                 swa_window=section.get("swa_window", 16), vocab_size=section["vocab_size"],
                                 seq_len=section["seq_length"])
        model.load_state_dict(saved["state_dict"])
        return model.eval(), section
    if section is None:
        raise ConfigError(f"{checkpoint} carries no model configuration (it was not written by `megatron-based-mqar "
                          "train --save`): give --config, a YAML whose model: section sets the trained model's "
                          f"{required_model_keys('LS')}")
    model, _ = load_model(config, checkpoint)
    return model, section


def main(argv: Sequence[str] | None = None) -> int:
    """``megatron-based-mqar``: train a small model on MQAR (``train``) or score a checkpoint (``eval``)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    quiet_known_warnings("--verbose" in argv)
    p = mqar_parser()
    args = p.parse_args(argv)

    initialize_parallel(1, seed=args.seed)
    if args.command == "train":
        section = mqar_model_section(args.pattern, hidden_size=args.hidden_size, swa_window=args.swa_window,
                                     vocab_size=args.vocab_size or 64, seq_len=args.seq_len or 64)
        model = build_mqar_model(args.pattern, hidden_size=args.hidden_size, swa_window=args.swa_window,
                                 vocab_size=section["vocab_size"], seq_len=section["seq_length"])
        task = MQARTask(section["vocab_size"], section["seq_length"], args.num_kv_pairs)
        losses = train_mqar(model, task, steps=args.steps, lr=args.lr, seed=args.seed)
        print(f"final training loss {sum(losses[-20:]) / len(losses[-20:]):.4f}")
        if args.save:
            save_mqar_checkpoint(args.save, model, section)
    else:
        if not args.checkpoint:
            p.error("eval needs --checkpoint (and --config for a checkpoint not written by `train --save`)")
        try:
            model, section = load_mqar_checkpoint(args.checkpoint, args.config)
        except ConfigError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        # The task defaults to the model's vocabulary and length.
        task = MQARTask(args.vocab_size or section["vocab_size"], args.seq_len or section["seq_length"],
                        args.num_kv_pairs)
    device = next(model.parameters()).device
    inputs, labels = mqar_batch(task, args.num_examples, torch.Generator().manual_seed(args.seed + 1))
    recall = evaluate_mqar(model, inputs.to(device), labels.to(device))
    print(f"MQAR recall {recall:.4f} (chance {task.chance:.4f}) on {args.num_examples} sequences of {task.seq_len} "
          f"tokens, {args.num_kv_pairs} key-value pairs; decode state {state_bytes_per_sequence(model)} bytes "
          f"per sequence")
    return 0


if __name__ == "__main__":
    sys.exit(main())
