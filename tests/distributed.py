"""Run a test body on N gloo processes. Workers are forked from the test process, which has already imported
torch and Megatron-Core (7-9 s per fresh interpreter otherwise). A worker's exception fails the test with its
traceback; a hung collective fails it after ``timeout`` seconds. ``start_method="spawn"`` for a worker that must
use CUDA after the test process touched it (a forked child then cannot).

Rank 0 hosts the rendezvous store, so it leaves only after every rank has said it is done: torch runs no barrier
after ``new_group`` (TORCH_DIST_INIT_BARRIER=0), so a rank that is not in a group can return while a member is still
building that group through the store; rank 0 exiting then resets the member's connection ("Connection reset by
peer" in ProcessGroupGloo)."""
from __future__ import annotations

import multiprocessing as mp
import os
import pickle
import time
import traceback

from megatron_based.runtime.launch_env import free_port


DONE_KEY = "tests/distributed/done"  # every rank adds 1 to it when it leaves
LEAVE_TIMEOUT_S = 60.0  # how long rank 0 waits for the others (a rank that died never arrives)


def _leave_together(rank: int, world_size: int, ok: bool) -> None:
    """Say this rank is done; rank 0, if its own work succeeded, keeps the store up until every rank has said so
    (or ``LEAVE_TIMEOUT_S`` passed). Not a collective: a failed rank must not leave the others waiting on it."""
    import torch.distributed as dist

    store = dist.distributed_c10d._get_default_store()
    try:
        store.add(DONE_KEY, 1)
    except dist.DistError:  # rank 0 is gone (it failed, and said so): nobody waits for this rank
        return
    if rank == 0 and ok:
        deadline = time.monotonic() + LEAVE_TIMEOUT_S
        while store.add(DONE_KEY, 0) < world_size and time.monotonic() < deadline:
            time.sleep(0.01)


def _worker(rank, world_size, port, fn, args, queue):
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    ok = False
    try:
        import torch

        torch.set_num_threads(1)
        result = fn(rank, world_size, *args)
        # Plain pickle copies tensor data into the message; the queue's own pickler would share storages through
        # file descriptors that vanish when this worker exits.
        queue.put((rank, "ok", pickle.dumps(result)))
        ok = True
    except BaseException:  # noqa: BLE001 - report everything to the parent
        queue.put((rank, "error", traceback.format_exc()))
    finally:
        import torch.distributed as dist

        if dist.is_initialized():
            if world_size > 1:
                _leave_together(rank, world_size, ok)
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
    results, errors, reported = {}, [], set()
    try:
        for _ in range(world_size):
            rank, status, payload = queue.get(timeout=timeout)
            reported.add(rank)
            if status == "ok":
                results[rank] = pickle.loads(payload)
            else:
                errors.append(f"rank {rank}:\n{payload}")
                break
    finally:
        exit_codes = {}
        for r, p in enumerate(procs):
            p.join(timeout=5 if errors else 30)
            exit_codes[r] = p.exitcode  # None: still running (killed next)
            if p.is_alive():
                p.kill()
    if errors:
        # a rank that died without a report (e.g. killed by a signal) may be why the reported one failed
        errors += [f"rank {r} exited with code {code} without a report" for r, code in exit_codes.items()
                   if r not in reported and code]
        raise AssertionError("\n".join(errors))
    return [results[r] for r in range(world_size)]
