"""Vocab-parallel cross entropy on low-precision logits: one read of the logits per pass, no fp32 copy."""
from __future__ import annotations

import torch
import torch.distributed as dist

from .._common import resolve_backend

__all__ = ["vocab_parallel_cross_entropy"]

_TRITON_DTYPES = (torch.bfloat16, torch.float16, torch.float32)


def vocab_parallel_cross_entropy(logits: torch.Tensor, target: torch.Tensor, tp_group=None, *,
                                 inplace_backward: bool = False, backend=None) -> torch.Tensor:
    """Per-token ``loss = logsumexp(logits) - logits[target]`` (fp32, shape ``target.shape``).

    logits ``[..., V_local]`` (bf16 / fp16 / fp32; last dim contiguous avoids a copy): rank r of ``tp_group``
    holds the vocabulary slice ``[r * V_local, (r + 1) * V_local)``, as in Megatron; ``tp_group=None`` means
    one rank (the whole vocabulary). target ``[...]`` int64 / int32 global ids; a target outside every slice
    gives ``loss = logsumexp`` and no one-hot term (Megatron's behaviour). The gradient is
    ``(softmax - onehot) * dloss`` in the logits dtype (fp32 math). Deterministic.

    inplace_backward: write the gradient into the logits' storage instead of a new buffer (saves one
    ``[N, V_local]`` tensor; only when nothing else reads the logits after this backward; eager mode only).
    backend: None (Triton for CUDA tensors, PyTorch otherwise, or ``based_kernels.use_backend``), "triton",
    "torch".
    """
    if logits.dim() < 1 or logits.shape[-1] < 1:
        raise ValueError(f"logits must be [..., V_local] with V_local >= 1; got {tuple(logits.shape)}")
    if tuple(target.shape) != tuple(logits.shape[:-1]):
        raise ValueError(f"target {tuple(target.shape)} must be logits.shape[:-1] = {tuple(logits.shape[:-1])}")
    if target.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"target must hold int64 or int32 token ids; got {target.dtype}")
    if target.device != logits.device:
        raise ValueError(f"logits ({logits.device}) and target ({target.device}) are on different devices")
    if not logits.is_floating_point():
        raise TypeError(f"logits must be floating point; got {logits.dtype}")
    V = logits.shape[-1]
    world = 1 if tp_group is None else dist.get_world_size(tp_group)
    group = tp_group if world > 1 else None
    v_start = dist.get_rank(tp_group) * V if world > 1 else 0
    x = logits.reshape(-1, V)
    if x.stride(1) != 1:
        x = x.contiguous()
    t = target.reshape(-1)
    use_triton = resolve_backend(backend, logits) == "triton" and x.shape[0] > 0
    if use_triton and logits.dtype not in _TRITON_DTYPES:
        raise TypeError(f"the Triton cross entropy takes {_TRITON_DTYPES} logits; got {logits.dtype} "
                        f"(use backend='torch')")
    from .ops import CrossEntropyFunction, cross_entropy_fwd_op

    if use_triton and torch.compiler.is_compiling():
        loss = cross_entropy_fwd_op(x, t, v_start, None if group is None else group.group_name)[0]
    else:
        loss = CrossEntropyFunction.apply(x, t, v_start, group, inplace_backward, use_triton)
    return loss.view(target.shape)
