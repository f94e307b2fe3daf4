"""Small shared pieces of the Megatron-level tests."""
from __future__ import annotations

import contextlib

import torch
import torch.distributed as dist

from megatron_based.model.config import BasedConfig
from megatron_based.model import build_model
from megatron_based.runtime.parallel import initialize_parallel


def tiny_config(pattern="CLSA", **overrides) -> BasedConfig:
    kw = dict(layer_pattern=pattern, hidden_size=32, num_attention_heads=4, feature_dim=4, swa_window=6,
              use_cpu_initialization=True)
    kw.update(overrides)
    return BasedConfig(**kw)


def tiny_model(pattern="CLSA", *, vocab=64, seed=0, **overrides):
    """A small BASED model; the same seed gives the same full weights at any TP size (CPU master-weight init)."""
    torch.manual_seed(seed)
    return build_model(tiny_config(pattern, **overrides), vocab_size=vocab, max_sequence_length=64,
                       make_vocab_size_divisible_by=8)


def bf16_model_and_fp64_reference(pattern: str, vocab: int):
    """A bf16 model (d 64, max length 64, seed 0) and an fp64 copy of it with the same, bf16-rounded weights: the
    oracle the bf16 decode guards measure against."""
    kw = dict(layer_pattern=pattern, hidden_size=64, num_attention_heads=4, feature_dim=4, swa_window=6,
              use_cpu_initialization=True)
    torch.manual_seed(0)
    model = build_model(BasedConfig(**kw, params_dtype=torch.bfloat16, bf16=True), vocab_size=vocab,
                        max_sequence_length=64).eval()
    reference = build_model(BasedConfig(**kw), vocab_size=vocab, max_sequence_length=64).double().eval()
    with torch.no_grad():
        for ref_param, param in zip(reference.parameters(), model.parameters(), strict=True):
            ref_param.copy_(param)
    return model, reference


def greedy_by_full_forwards(model, prompts, new_tokens: int, vocab: int) -> list[list[int]]:
    """The greedy continuation of each prompt, one full forward per generated token (the reference for the
    generator's prefill + decode)."""
    out = []
    with torch.no_grad():
        for seq in map(list, prompts):
            for _ in range(new_tokens):
                logits = model(torch.tensor([seq]), torch.arange(len(seq))[None], None)
                seq.append(int(logits[0, -1, :vocab].argmax()))
            out.append(seq[-new_tokens:])
    return out


def gather_tp(t: torch.Tensor, dim: int, stride: int = 1, group=None) -> torch.Tensor:
    """Reassemble a tensor split over the TP group along ``dim`` (with Megatron's partition stride)."""
    world = dist.get_world_size(group)
    if world == 1:
        return t
    parts = [torch.empty_like(t) for _ in range(world)]
    dist.all_gather(parts, t.contiguous(), group=group)
    pieces = [p.chunk(stride, dim=dim) for p in parts]
    return torch.cat([pieces[r][s] for s in range(stride) for r in range(world)], dim=dim)


def full_grads(model, tp_group) -> dict[str, torch.Tensor]:
    """Every parameter gradient at its TP=1 shape; partial gradients of sequence-parallel norms are summed."""
    out = {}
    for name, p in model.named_parameters():
        g = p.grad.detach().clone()
        if getattr(p, "sequence_parallel", False):
            dist.all_reduce(g, group=tp_group)
        if getattr(p, "tensor_model_parallel", False):
            g = gather_tp(g, p.partition_dim, getattr(p, "partition_stride", 1), tp_group)
        out[name] = g
    return out


def loss_logits_grads(model):
    """One forward / backward of ``model`` on a fixed batch ``[2, 16]`` (vocab 64) under its TP group: the loss,
    the TP-gathered logits and the full (TP-gathered) gradients, for comparing TP / SP layouts with one rank."""
    from megatron.core import parallel_state

    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 64, (2, 16), generator=g)
    labels = torch.randint(0, 64, (2, 16), generator=g)
    pos = torch.arange(16).expand(2, 16)
    tp_group = parallel_state.get_tensor_model_parallel_group()
    logits = gather_tp(model(ids, pos, None), dim=-1, group=tp_group)
    loss = model(ids, pos, None, labels=labels)
    loss.sum().backward()
    return loss.detach(), logits.detach(), full_grads(model, tp_group)


@contextlib.contextmanager
def in_process_group(monkeypatch, cuda_graphs: bool = False):
    """torch.distributed and Megatron's groups for this one process. GPU tests cannot use run_distributed: its
    workers are forked, and a process forked after the parent queried CUDA (conftest's torch.cuda.is_available())
    fails at its first CUDA call ("Cannot re-initialize CUDA in forked subprocess")."""
    import torch.distributed as dist
    from megatron.core import parallel_state

    from megatron_based.runtime.parallel import initialize_parallel

    for key, value in dict(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0").items():  # one process: no port to bind
        monkeypatch.setenv(key, value)
    initialize_parallel(1, cuda_graphs=cuda_graphs)
    try:
        yield
    finally:
        parallel_state.destroy_model_parallel()
        dist.destroy_process_group()


__all__ = ["in_process_group", "tiny_config", "tiny_model", "gather_tp", "full_grads", "initialize_parallel"]
