"""Context parallelism: per-layer communication time vs compute, per mixer, at fixed tokens per rank.

For each mixer (L, S, C, A) and local length T_local it times, forward + backward, median over iterations:
  local  the single-rank op on this rank's T_local tokens (no communication),
  cp     the context-parallel op on the same shard (what a CP layer costs),
  comm   the layer's collectives alone (the same autograd Functions on tensors of the same size),
and reports bytes per rank per direction from the collective counter. Before timing, the CP output is checked
against the single-rank op on the full (gathered) sequence.

    torchrun --nproc_per_node 2 benchmarks/cp_comm.py                      # 2 GPUs, bf16, T_local 8k and 32k
    torchrun --nproc_per_node 2 benchmarks/cp_comm.py --device cpu --t-local 64 128 --hidden 64 --heads 4 \
        --feature-dim 4 --window 16 --iters 2                              # a CPU / gloo smoke run

Prints a table on rank 0 and writes JSON to benchmarks/results/cp_comm.json.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from megatron.core import parallel_state

import based_kernels
from megatron_based.model import context_parallel as cp
from megatron_based.model.mixers.base_conv.context_parallel import base_conv_cp
from megatron_based.model.mixers.sliding_window.context_parallel import sliding_window_attention_cp
from megatron_based.model.mixers.softmax_attention.context_parallel import _GatherSequence, softmax_attention_cp
from megatron_based.model.mixers.taylor.context_parallel import _ExclusivePrefix, taylor_attention_cp
from megatron_based.runtime.comm_stats import count_collectives
from megatron_based.runtime.parallel import initialize_parallel


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", choices=["cuda", "cpu"], default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--t-local", type=int, nargs="+", default=[8192, 32768], help="tokens per CP rank")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--hidden", type=int, default=1024, help="model width d (based-360m: 1024)")
    p.add_argument("--heads", type=int, default=16)
    p.add_argument("--feature-dim", type=int, default=16)
    p.add_argument("--window", type=int, default=128)
    p.add_argument("--conv-kernel", type=int, default=3)
    p.add_argument("--mixers", default="LSCA")
    p.add_argument("--iters", type=int, default=20)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--out", default="benchmarks/results/cp_comm.json")
    return p.parse_args()


def timed(fn, warmup: int, iters: int, device: str) -> float:
    """Median milliseconds of ``fn()`` (CUDA events on GPU, wall clock on CPU)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(iters):
        if device == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def fwd_bwd(fn, xs):
    """A closure running ``fn(*xs)`` forward and backward (ones as output gradient)."""
    def run():
        for x in xs:
            x.grad = None
        y = fn(*xs)
        y.backward(torch.ones_like(y))
    return run


def mixer_setup(kind, args, T, dtype, device, group):
    """(cp op, single-rank op, inputs [(tensor, seq_dim)] for the full sequence, comm-only op and its inputs)."""
    B, d, H, f = args.batch, args.hidden, args.heads, args.feature_dim
    dh = d // H
    g = torch.Generator(device="cpu").manual_seed(0)
    rnd = lambda *s, scale=1.0: (torch.randn(*s, generator=g) * scale).to(device, dtype)  # noqa: E731
    P, r = group.size(), group.rank()
    L = T // P
    if kind == "L":
        state = torch.zeros(B, H, based_kernels.taylor_attention.feature_dim(f), dh + 1, device=device)
        return (lambda q, k, v: taylor_attention_cp(q, k, v, eps=1e-6, cp_group=group),
                lambda q, k, v: based_kernels.taylor_linear_attention(q, k, v, eps=1e-6)[0],
                [(rnd(B, T, H, f, scale=0.5), 1), (rnd(B, T, H, f, scale=0.5), 1), (rnd(B, T, H, dh), 1)],
                lambda s: _ExclusivePrefix.apply(s, group, "L", None), [state])
    if kind == "S":
        W = args.window
        tail = torch.zeros(B, min(W, L), H, 2 * dh, device=device, dtype=dtype)
        return (lambda q, k, v: sliding_window_attention_cp(q, k, v, window=W, cp_group=group),
                lambda q, k, v: based_kernels.sliding_window_attention(q, k, v, window=W),
                [(rnd(B, T, H, dh), 1), (rnd(B, T, H, dh), 1), (rnd(B, T, H, dh), 1)],
                lambda t: cp.exchange_halo(t, W, L, group, None, "S"), [tail])
    if kind == "C":
        C, rows = 2 * d, args.conv_kernel - 1
        tail = torch.zeros(B, min(rows, L), C, device=device, dtype=dtype)
        return (lambda u1, u2, w: base_conv_cp(u1, u2, w, cp_group=group),
                lambda u1, u2, w: based_kernels.base_conv(u1, u2, w)[0],
                [(rnd(B, T, C), 1), (rnd(B, T, C), 1), (rnd(C, args.conv_kernel, scale=0.5), None)],
                lambda t: cp.exchange_halo(t, rows, L, group, None, "C"), [tail])
    kv = torch.zeros(L, B, H, 2 * dh, device=device, dtype=dtype)
    return (lambda q, k, v: softmax_attention_cp(q, k, v, scale=None, cp_group=group),
            lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=True),
            [(rnd(B, H, T, dh), 2), (rnd(B, H, T, dh), 2), (rnd(B, H, T, dh), 2)],
            lambda t: _GatherSequence.apply(t, group, "A"), [kv])


def shard(t, dim, r, P):
    return t if dim is None else t.narrow(dim, r * (t.shape[dim] // P), t.shape[dim] // P)


def main():
    args = parse_args()
    initialize_parallel(1, 1, int(os.environ.get("WORLD_SIZE", 1)), backend="nccl" if args.device == "cuda" else "gloo")
    group = parallel_state.get_context_parallel_group()
    P, r = group.size(), group.rank()
    if P < 2:
        raise SystemExit("run with 2+ processes, e.g. torchrun --nproc_per_node 2 benchmarks/cp_comm.py")
    device = torch.device("cuda", torch.cuda.current_device()) if args.device == "cuda" else torch.device("cpu")
    dtype = torch.bfloat16 if args.device == "cuda" else torch.float32
    tol = 3e-2 if dtype == torch.bfloat16 else 1e-4
    rows = []
    for T_local in args.t_local:
        for kind in args.mixers:
            cp_fn, ref_fn, inputs, comm_fn, comm_in = mixer_setup(kind, args, T_local * P, dtype, device, group)
            ydim = inputs[0][1]
            local = [shard(t, d, r, P).clone().requires_grad_() for t, d in inputs]
            with torch.no_grad():  # correct first: this rank's slice of the single-rank result on the full sequence
                ref = shard(ref_fn(*[t.float() for t, _ in inputs]), ydim, r, P)
                err = ((cp_fn(*local).float() - ref).abs().max() / ref.abs().max()).item()
            if not err < tol:
                raise SystemExit(f"{kind} T_local={T_local}: CP output differs from the single-rank op "
                                 f"(relative error {err:.2e} > {tol})")
            del ref
            with count_collectives() as counter:
                fwd_bwd(cp_fn, local)()
            nbytes = {d: sum(v[1] for (_, dd, _), v in counter.table().items() if dd == d) for d in ("forward", "backward")}
            comm_in = [t.requires_grad_() for t in comm_in]
            t_local = timed(fwd_bwd(ref_fn, local), args.warmup, args.iters, args.device)
            t_cp = timed(fwd_bwd(cp_fn, local), args.warmup, args.iters, args.device)
            t_comm = timed(fwd_bwd(comm_fn, comm_in), args.warmup, args.iters, args.device)
            rows.append(dict(mixer=kind, t_local=T_local, local_ms=t_local, cp_ms=t_cp, comm_ms=t_comm,
                             overhead=t_cp / t_local - 1, bytes_sent_forward=nbytes["forward"],
                             bytes_sent_backward=nbytes["backward"], rel_err=err, rank=r))
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, rows)
    if dist.get_rank() == 0:
        report(gathered, args, P)
    dist.destroy_process_group()


def report(per_rank, args, P):
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"CP={P}: one layer forward+backward, median ms, max over ranks")
    for col in ("mixer", "T_local", "local", "cp", "comm alone", "cp/local - 1", "bytes sent fwd", "bytes sent bwd"):
        table.add_column(col, justify="right")
    rows = []
    for i, row in enumerate(per_rank[0]):
        worst = {k: max(rank_rows[i][k] for rank_rows in per_rank)
                 for k in ("local_ms", "cp_ms", "comm_ms", "bytes_sent_forward", "bytes_sent_backward", "rel_err")}
        rows.append(dict(row, **worst, overhead=worst["cp_ms"] / worst["local_ms"] - 1))
        table.add_row(row["mixer"], str(row["t_local"]), f"{worst['local_ms']:.3f}", f"{worst['cp_ms']:.3f}",
                      f"{worst['comm_ms']:.3f}", f"{rows[-1]['overhead']:+.1%}", f"{worst['bytes_sent_forward']:,}",
                      f"{worst['bytes_sent_backward']:,}")
    Console().print(table)
    device = torch.cuda.get_device_name() if args.device == "cuda" else "cpu"
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(dict(device=device, cp=P, torch=torch.__version__, args=vars(args), rows=rows,
                                   date=time.strftime("%Y-%m-%d")), indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
