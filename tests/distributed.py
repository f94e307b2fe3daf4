"""Run a test body on N gloo processes. Workers are forked from the test process, which has already imported
torch and Megatron-Core (7-9 s per fresh interpreter otherwise). A worker's exception fails the test with its
traceback; a hung collective fails it after ``timeout`` seconds. ``start_method="spawn"`` for a worker that must
use CUDA after the test process touched it (a forked child then cannot)."""
from __future__ import annotations

import multiprocessing as mp
import os
import pickle
import traceback

from megatron_based.runtime.launch_env import free_port


def _worker(rank, world_size, port, fn, args, queue):
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    try:
        import torch

        torch.set_num_threads(1)
        result = fn(rank, world_size, *args)
        # Plain pickle copies tensor data into the message; the queue's own pickler would share storages through
        # file descriptors that vanish when this worker exits.
        queue.put((rank, "ok", pickle.dumps(result)))
    except BaseException:  # noqa: BLE001 - report everything to the parent
        queue.put((rank, "error", traceback.format_exc()))
    finally:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()


def run_distributed(fn, world_size: int, *args, timeout: float = 300.0, start_method: str | None = None) -> list:
    """Call ``fn(rank, world_size, *args)`` on ``world_size`` forked processes (spawned with
    ``start_method="spawn"``: ``fn`` must then be importable); return their results by rank."""
    ctx = mp.get_context(start_method or "fork")
    queue = ctx.Queue()
    port = free_port()  # below the OS's ephemeral range: no other socket takes it before rank 0 binds it
    procs = [ctx.Process(target=_worker, args=(r, world_size, port, fn, args, queue)) for r in range(world_size)]
    for p in procs:
        p.start()
    results, errors = {}, []
    try:
        for _ in range(world_size):
            rank, status, payload = queue.get(timeout=timeout)
            if status == "ok":
                results[rank] = pickle.loads(payload)
            else:
                errors.append(f"rank {rank}:\n{payload}")
                break
    finally:
        for p in procs:
            p.join(timeout=5 if errors else 30)
            if p.is_alive():
                p.kill()
    if errors:
        raise AssertionError("\n".join(errors))
    return [results[r] for r in range(world_size)]
