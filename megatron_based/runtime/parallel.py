"""Process-group set-up shared by training, tests and benchmarks: torch.distributed (NCCL on GPU, gloo on CPU),
Megatron-Core's model-parallel groups, and the model-parallel RNG seeds."""
from __future__ import annotations

import os

import torch
import torch.distributed as dist
from megatron.core import parallel_state, tensor_parallel

from .cpu_compat import apply_cpu_shims
from .launch_env import DEFAULT_PORT


def initialize_parallel(tensor_model_parallel_size: int = 1, pipeline_model_parallel_size: int = 1,
                        context_parallel_size: int = 1, seed: int = 1234, backend: str | None = None,
                        cuda_graphs: bool = False) -> None:
    """Initialise torch.distributed from the environment (RANK, WORLD_SIZE, MASTER_ADDR/PORT; a single process
    needs none of them: it rendezvouses with an in-process store, binding no port) and Megatron's groups with rank
    order tp-cp-dp-pp (tp innermost).
    ``cuda_graphs``: the model uses Megatron's CUDA graphs (``cuda_graph_impl: local``), whose layers need the
    CUDA-graph-safe RNG tracker."""
    if not dist.is_initialized():
        if backend is None:
            backend = "nccl" if torch.cuda.is_available() else "gloo"
        if backend == "nccl":
            # The rank's GPU, set but not bound (no ``device_id``): binding makes NCCL communicators at once for
            # the default group and every Megatron group split from it, each holding its resources whether it
            # communicates or not; NeMo-RL measured a Megatron training slower with it (NVIDIA-NeMo/RL#3073).
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
        world = int(os.environ.get("WORLD_SIZE", 1))
        if world == 1:
            # Nobody else has to find this process: an in-process store, no TCP port to bind (a free port taken
            # from the OS can be taken by another process before the store binds it: EADDRINUSE).
            dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)
        else:
            os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
            if not os.environ.get("MASTER_PORT"):
                os.environ["MASTER_PORT"] = str(DEFAULT_PORT)  # the ranks must agree on one: torchrun's
            dist.init_process_group(backend, rank=int(os.environ.get("RANK", 0)), world_size=world)
    apply_cpu_shims()
    world = dist.get_world_size()
    model_parallel = tensor_model_parallel_size * pipeline_model_parallel_size * context_parallel_size
    if world % model_parallel:
        raise ValueError(
            f"world size ({world}) must be divisible by tensor ({tensor_model_parallel_size}) x pipeline "
            f"({pipeline_model_parallel_size}) x context ({context_parallel_size}) parallel sizes = {model_parallel}"
        )
    parallel_state.destroy_model_parallel()
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=tensor_model_parallel_size,
        pipeline_model_parallel_size=pipeline_model_parallel_size,
        context_parallel_size=context_parallel_size,
    )
    torch.manual_seed(seed)
    tensor_parallel.model_parallel_cuda_manual_seed(seed, use_cudagraphable_rng=cuda_graphs,
                                                    force_reset_rng=cuda_graphs)


def shutdown_parallel() -> None:
    """End of a multi-process command that finished normally: wait until every rank is done (no rank leaves while
    another is still in a collective), then destroy the process group (gloo's worker threads joined, NCCL's
    communicators freed). Without it a 2-process CPU job could abort at exit after its output ("terminate called
    without an active exception"). Not for error paths: a rank that failed would leave the others waiting."""
    if dist.is_initialized():
        dist.barrier()
        parallel_state.destroy_model_parallel()  # its groups belong to the process group destroyed next
        dist.destroy_process_group()
