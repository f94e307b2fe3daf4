"""tests/distributed.py: rank 0, which hosts the rendezvous store, stays until every rank is done."""
from __future__ import annotations

import time

from tests.distributed import run_distributed


def _late_group_member(rank, world_size):
    """Rank 0 returns at once; rank 1 builds its one-rank group through the store a second later. torch runs no
    barrier after ``new_group``, so without the helper's wait rank 1 finds the store gone (connection refused or
    reset), the race the one-rank groups of test_mixers_cp_equal_single_rank can lose."""
    import torch
    import torch.distributed as dist

    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    if rank == 1:
        time.sleep(1.0)
    solo = [dist.new_group([i]) for i in range(world_size)][rank]
    x = torch.full((3,), float(rank + 1))
    dist.all_reduce(x, group=solo)
    return x.tolist()


def test_rank0_keeps_the_store_until_every_rank_is_done():
    assert run_distributed(_late_group_member, 2) == [[1.0] * 3, [2.0] * 3]


def _fails_on_rank(rank, world_size, bad):
    import torch.distributed as dist

    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    if rank == bad:
        raise ValueError(f"rank {rank} fails")
    return rank


def test_a_failing_rank_fails_the_test_without_waiting():
    """Either rank fails: the test reports its error at once (nobody waits the leave timeout for a failed rank)."""
    for bad in (0, 1):
        start = time.monotonic()
        try:
            run_distributed(_fails_on_rank, 2, bad)
        except AssertionError as e:
            assert f"rank {bad} fails" in str(e)
        else:
            raise AssertionError("run_distributed returned although a rank raised")
        assert time.monotonic() - start < 20
