"""Counting the collectives this project issues (context-parallel states, halos, K/V gathers, loss counts).

Every collective in ``megatron_based.model.context_parallel`` goes through the wrappers below, which add one record per
call to each active :class:`CommCounter`: the layer, the direction (forward / backward), the op, and the bytes this
rank sent and received. Tests assert counts and bytes per layer; benchmarks report them next to timings::

    with count_collectives() as counter:
        loss = model(...).sum(); loss.backward()
    counter.table()   # {(layer, direction, op): (calls, bytes_sent, bytes_received)}

Megatron-Core's own tensor/sequence-parallel collectives are not counted (they are not this project's).
"""
from __future__ import annotations

import contextlib
from collections import defaultdict
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

__all__ = ["CommCounter", "count_collectives", "all_gather_into_tensor", "reduce_scatter_tensor", "all_reduce",
           "batch_isend_irecv"]


@dataclass
class CommCounter:
    """Calls and bytes per ``(layer, direction, op)`` on this rank."""

    records: dict = field(default_factory=lambda: defaultdict(lambda: [0, 0, 0]))

    def add(self, layer: str, direction: str, op: str, sent: int, received: int) -> None:
        rec = self.records[(layer, direction, op)]
        rec[0] += 1
        rec[1] += sent
        rec[2] += received

    def table(self) -> dict[tuple[str, str, str], tuple[int, int, int]]:
        """``{(layer, direction, op): (calls, bytes_sent, bytes_received)}``, sorted."""
        return {key: tuple(val) for key, val in sorted(self.records.items())}

    def calls(self, direction: str | None = None) -> int:
        return sum(v[0] for (_, d, _), v in self.records.items() if direction in (None, d))


_active: list[CommCounter] = []


@contextlib.contextmanager
def count_collectives():
    """Record every wrapped collective issued inside the ``with`` block (forward and backward alike)."""
    counter = CommCounter()
    _active.append(counter)
    try:
        yield counter
    finally:
        _active.remove(counter)


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def _record(layer: str, direction: str, op: str, sent: int, received: int) -> None:
    for counter in _active:
        counter.add(layer, direction, op, sent, received)


def all_gather_into_tensor(output: torch.Tensor, tensor: torch.Tensor, group, *, layer: str, direction: str,
                           async_op: bool = False):
    """``dist.all_gather_into_tensor``; ``output`` is ``[P * n, ...]`` or ``[P, n, ...]`` (a contiguous buffer).
    Counts ``tensor`` sent and the other ranks' parts received."""
    _record(layer, direction, "all_gather", _nbytes(tensor), _nbytes(output) - _nbytes(tensor))
    return dist.all_gather_into_tensor(output.view((-1,) + tensor.shape[1:]), tensor, group=group, async_op=async_op)


def reduce_scatter_tensor(output: torch.Tensor, tensor: torch.Tensor, group, *, layer: str, direction: str,
                          async_op: bool = False):
    """``dist.reduce_scatter_tensor`` (sum) along dim 0; counts the parts for other ranks sent and received."""
    other = _nbytes(tensor) - _nbytes(output)
    _record(layer, direction, "reduce_scatter", other, other)
    return dist.reduce_scatter_tensor(output, tensor, op=dist.ReduceOp.SUM, group=group, async_op=async_op)


def all_reduce(tensor: torch.Tensor, group, *, layer: str, direction: str, async_op: bool = False):
    """``dist.all_reduce`` (sum), counted as the tensor sent and received once."""
    _record(layer, direction, "all_reduce", _nbytes(tensor), _nbytes(tensor))
    return dist.all_reduce(tensor, group=group, async_op=async_op)


def batch_isend_irecv(sends: list[tuple[torch.Tensor, int]], recvs: list[tuple[torch.Tensor, int]], group, *,
                      layer: str, direction: str) -> None:
    """One batched point-to-point exchange and its wait: ``sends``/``recvs`` are ``(tensor, peer rank in group)``.
    A rank with nothing to send or receive issues nothing (and records nothing)."""
    if not sends and not recvs:
        return
    _record(layer, direction, "p2p", sum(_nbytes(t) for t, _ in sends), sum(_nbytes(t) for t, _ in recvs))
    ops = [dist.P2POp(dist.isend, t, group=group, group_peer=p) for t, p in sends]
    ops += [dist.P2POp(dist.irecv, t, group=group, group_peer=p) for t, p in recvs]
    for work in dist.batch_isend_irecv(ops):
        work.wait()
