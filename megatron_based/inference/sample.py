"""A plain greedy sampler for the demo and tests: one full forward over the (last ``seq_length``) tokens per new
token. Simple and obviously right; constant-memory decoding lives in :mod:`megatron_based.inference.generation`.
Load a training checkpoint with :func:`megatron_based.inference.loader.load_for_inference`."""
from __future__ import annotations

import torch


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
