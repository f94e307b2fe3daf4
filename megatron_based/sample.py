"""A plain greedy sampler for the demo and tests: one full forward over the (last ``seq_length``) tokens per new
token. Simple and obviously right; constant-memory decoding lives in :mod:`megatron_based.generation`."""
from __future__ import annotations

from pathlib import Path

import torch


def load_for_inference(checkpoint: str | Path):
    """Build the model a training checkpoint was trained with, at the current TP size, and load its weights.
    ``initialize_parallel`` must have run. Returns ``(model, ModelSpec, tokenizer)``."""
    from megatron.core import parallel_state

    from . import checkpointing
    from .config import model_spec_from_dict
    from .data import load_tokenizer
    from .model import build_model

    path = checkpointing.resolve(str(checkpoint), None)
    if path is None:
        raise checkpointing.CheckpointError(f"no complete checkpoint under {checkpoint}")
    run = checkpointing.saved_run_config(path)
    spec = model_spec_from_dict(
        run["model"], tensor_model_parallel_size=parallel_state.get_tensor_model_parallel_world_size(),
        use_cpu_initialization=not torch.cuda.is_available())
    model = build_model(spec.config, vocab_size=spec.vocab_size, max_sequence_length=spec.seq_length,
                        make_vocab_size_divisible_by=spec.make_vocab_size_divisible_by)
    if torch.cuda.is_available():
        model.cuda()
    checkpointing.load_checkpoint(path, model)
    return model.eval(), spec, load_tokenizer(run["data"]["tokenizer_model"])


@torch.no_grad()
def full_logits(model, tokens: torch.Tensor) -> torch.Tensor:
    """Logits ``[b, s, vocab]`` over the whole (padded) vocabulary, gathered across tensor-parallel ranks."""
    from megatron.core.tensor_parallel import gather_from_tensor_model_parallel_region

    positions = torch.arange(tokens.shape[1], device=tokens.device).expand_as(tokens)
    return gather_from_tensor_model_parallel_region(model(tokens, positions, attention_mask=None))


@torch.no_grad()
def greedy(model, prompt: list[int], max_new_tokens: int, *, seq_length: int, vocab_size: int,
           stop_token: int | None = None) -> list[int]:
    """Append the argmax token ``max_new_tokens`` times (padding ids >= ``vocab_size`` are never chosen)."""
    device = next(model.parameters()).device
    ids = list(prompt)
    for _ in range(max_new_tokens):
        window = torch.tensor([ids[-seq_length:]], device=device)
        nxt = int(full_logits(model, window)[0, -1, :vocab_size].argmax())
        ids.append(nxt)
        if nxt == stop_token:
            break
    return ids[len(prompt):]
