"""One training step's pieces, shared by the Megatron loop (:mod:`.loop`) and the DeepSpeed engine
(:mod:`.deepspeed_engine`): the context-parallel batch slice, the per-token loss, ``forward_step``, the global loss
all ranks agree on, the SIGTERM watcher and :class:`TrainingStopped`."""
from __future__ import annotations

import signal
from functools import partial

import torch
import torch.distributed as dist

from ..model.context_parallel import shard_batch_for_cp

class TrainingStopped(RuntimeError):
    """Training stopped on purpose (too many non-finite steps, non-finite parameters); the last good checkpoint is
    kept."""


def context_parallel_slice(batch: dict) -> dict:
    """The CP hook: CP rank r keeps tokens [r L, (r+1) L) with their global position ids (contiguous sharding,
    docs/parallelism.md; never Megatron's zig-zag). The BASED mixers pass states and halos between ranks; the loss
    is normalised by the global token count through ``calculate_per_token_loss``."""
    from megatron.core import parallel_state

    if parallel_state.get_context_parallel_world_size() == 1:
        return batch
    return shard_batch_for_cp(batch)


def loss_func(loss_mask: torch.Tensor, output_tensor: torch.Tensor):
    """Per-token loss summed over the micro-batch, with its token count: Megatron normalises by the global count
    (``calculate_per_token_loss``), so every token weighs the same whatever the micro-batch / DP / CP split."""
    mask = loss_mask.reshape(-1).float()
    loss_sum = (output_tensor.float().reshape(-1) * mask).sum()
    n = mask.sum().to(torch.int)
    return loss_sum, n, {"lm loss": torch.stack([loss_sum.detach(), mask.sum().detach()])}


def forward_step(data_iterator, model):
    batch = next(data_iterator)
    if torch.cuda.is_available():
        batch = {k: v.cuda(non_blocking=True) for k, v in batch.items()}
    batch = context_parallel_slice(batch)
    output = model(batch["tokens"], batch["position_ids"], attention_mask=None, labels=batch["labels"])
    return output, partial(loss_func, batch["loss_mask"])


def global_loss(losses: list[dict], device) -> float:
    """Token-weighted loss over the global batch, identical on every rank (so all ranks agree to skip a step)."""
    from megatron.core import parallel_state

    total = torch.zeros(2, dtype=torch.float64, device=device)
    for item in losses:
        total += item["lm loss"].to(total)
    dist.all_reduce(total, group=parallel_state.get_data_parallel_group(with_context_parallel=True))
    dist.broadcast(total, src=parallel_state.get_pipeline_model_parallel_last_rank(),
                   group=parallel_state.get_pipeline_model_parallel_group())
    return float(total[0] / total[1])


class Sigterm:
    """Remembers a SIGTERM (slurm preemption, ``timeout``, torchrun stopping); the loop checkpoints and exits at the
    end of the step. slurm and ``timeout`` send it to every process of the job, torchrun to each worker's process
    group: the save must start no helper process such a signal would kill
    (``checkpointing._write_results_in_process``), and a repeated SIGTERM changes nothing. torchrun and slurm send
    SIGKILL 30 s later (their defaults)."""

    def __init__(self):
        self.received = False
        self.previous = signal.signal(signal.SIGTERM, self._handle)

    def _handle(self, signum, frame):
        self.received = True

    def any_rank(self, device) -> bool:
        flag = torch.tensor([float(self.received)], device=device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())

    def restore(self):
        signal.signal(signal.SIGTERM, self.previous)
