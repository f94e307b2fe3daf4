"""``megatron-based-eval``: perplexity of a checkpoint on a text file, Hugging Face style.

The text is tokenized as one stream and scored with windows of ``seq_length`` tokens moved by ``stride``
(default: ``seq_length``, no overlap); each window scores only the targets that no earlier window scored, so every
token after the first is predicted exactly once, with up to ``seq_length - stride`` tokens of extra context.
Reports the mean negative log-likelihood per token (nats) and ``ppl = exp(loss)``.
"""
from __future__ import annotations

import json
import math
import sys
from typing import Sequence

import torch

from ..model.config import ConfigError
from ..runtime.cli import bad_option, fail
from ..runtime.noise import quiet_known_warnings
from ..runtime.parallel import initialize_parallel, shutdown_parallel
from ..training.checkpointing import CheckpointError
from ..training.data import DataError, load_tokenizer
from .cli import eval_parser
from .convert import ConversionError
from .loader import load_model

__all__ = ["windows", "perplexity", "main"]


def windows(num_tokens: int, seq_length: int, stride: int) -> list[tuple[int, int, int]]:
    """``(begin, end, first_scored)`` per window over ``num_tokens`` tokens: inputs ``[begin, end)``, targets
    ``[begin + 1, end + 1)``, of which those at input positions ``>= first_scored`` count."""
    if not 1 <= stride <= seq_length:
        raise ValueError(f"stride ({stride}) must be in 1..seq_length ({seq_length})")
    if num_tokens < 2:
        raise ValueError(f"the text has {num_tokens} token(s): perplexity needs at least 2")
    out, scored_until = [], 0  # targets of input positions < scored_until are done
    begin = 0
    while scored_until < num_tokens - 1:
        end = min(begin + seq_length, num_tokens - 1)
        out.append((begin, end, scored_until))
        scored_until = end
        begin += stride
    return out


@torch.no_grad()
def perplexity(model, token_ids: torch.Tensor, *, seq_length: int, stride: int | None = None,
               batch_size: int = 8, vocab_size: int | None = None, progress: bool = True) -> dict:
    """``{"loss", "ppl", "tokens"}`` of a 1-D token tensor under ``model`` (a BASED ``GPTModel``)."""
    from megatron.core.tensor_parallel import gather_from_tensor_model_parallel_region
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    model.eval()
    device = next(model.parameters()).device
    ids = token_ids.to(device)
    spans = windows(ids.numel(), seq_length, stride or seq_length)
    nll, count = torch.zeros((), dtype=torch.float64, device=device), 0
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn())
    with Progress(*columns, disable=not progress, transient=True) as bar:
        job = bar.add_task("perplexity", total=len(spans))
        for i in range(0, len(spans), batch_size):
            group = spans[i: i + batch_size]
            width = max(e - b for b, e, _ in group)
            x = torch.zeros(len(group), width, dtype=torch.long, device=device)
            y = torch.zeros_like(x)
            mask = torch.zeros(x.shape, dtype=torch.bool, device=device)
            for row, (b, e, first) in enumerate(group):
                x[row, : e - b], y[row, : e - b] = ids[b:e], ids[b + 1: e + 1]
                mask[row, max(first - b, 0): e - b] = True
            logits = model(x, torch.arange(width, device=device).expand(len(group), width), attention_mask=None)
            logits = gather_from_tensor_model_parallel_region(logits).float()
            if vocab_size:
                logits = logits[..., :vocab_size]
            token_nll = torch.nn.functional.cross_entropy(logits.flatten(0, 1), y.flatten(), reduction="none")
            nll += token_nll[mask.flatten()].double().sum()
            count += int(mask.sum())
            loss = nll.item() / count
            bar.update(job, advance=len(group), description=f"perplexity {math.exp(loss):.3f}")
    loss = nll.item() / count
    return {"loss": loss, "ppl": math.exp(loss), "tokens": count}


def main(argv: Sequence[str] | None = None) -> int:
    """``megatron-based-eval``: loss and perplexity of a checkpoint on a text file."""
    argv = list(sys.argv[1:] if argv is None else argv)
    quiet_known_warnings("--verbose" in argv)
    p = eval_parser()
    args = p.parse_args(argv)

    error = bad_option(args, files=["config", "text"] + ([] if args.tokenizer == "bytes" else ["tokenizer"]),
                       paths=["checkpoint"], outputs=["json"],
                       positive=["seq_length", "stride", "batch_size", "tensor_model_parallel_size"],
                       tensor_parallel=True)
    if error:
        return fail(p, error)
    try:  # the text before the model, then the model: a bad input fails in one line
        encode = load_tokenizer(args.tokenizer).tokenize
        with open(args.text, encoding="utf-8") as fh:
            ids = torch.tensor(encode(fh.read()), dtype=torch.long)
        if ids.numel() < 2:
            return fail(p, f"--text {args.text} has {ids.numel()} token(s): perplexity needs at least 2")
        owns_group = not torch.distributed.is_initialized()  # a caller's group stays up
        initialize_parallel(args.tensor_model_parallel_size)
        model, spec = load_model(args.config, args.checkpoint,
                                 tensor_model_parallel_size=args.tensor_model_parallel_size, dtype=args.dtype)
    except UnicodeDecodeError as e:
        return fail(p, f"--text {args.text} is not UTF-8 text ({e.reason} at byte {e.start})")
    except (ConfigError, CheckpointError, ConversionError, DataError) as e:
        return fail(p, e)
    seq_length = args.seq_length or spec.seq_length
    if args.stride and args.stride > seq_length:
        return fail(p, f"--stride ({args.stride}) must be at most the window length, {seq_length} (--seq-length, "
                       "default the model's)")
    first = torch.distributed.get_rank() == 0
    result = perplexity(model, ids, seq_length=seq_length, stride=args.stride,
                        batch_size=args.batch_size, vocab_size=spec.vocab_size, progress=first)
    if first:
        print(f"loss {result['loss']:.4f} nats/token, perplexity {result['ppl']:.3f} over {result['tokens']} tokens")
        if args.json:
            with open(args.json, "w") as fh:
                json.dump(result, fh, indent=1)
    if owns_group:
        shutdown_parallel()
    return 0


if __name__ == "__main__":
    sys.exit(main())
