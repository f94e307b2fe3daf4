"""Full-forward logits for checks and tests (a whole-sequence forward, gathered over tensor-parallel ranks);
decoding lives in :mod:`megatron_based.inference.generation`.
Load a training checkpoint with :func:`megatron_based.inference.loader.load_for_inference`."""
from __future__ import annotations

import torch


@torch.no_grad()
def full_logits(model, tokens: torch.Tensor) -> torch.Tensor:
    """Logits ``[b, s, vocab]`` over the whole (padded) vocabulary, gathered across tensor-parallel ranks."""
    from megatron.core.tensor_parallel import gather_from_tensor_model_parallel_region

    positions = torch.arange(tokens.shape[1], device=tokens.device).expand_as(tokens)
    return gather_from_tensor_model_parallel_region(model(tokens, positions, attention_mask=None))
