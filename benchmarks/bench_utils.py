"""Timing helpers shared by the kernel benchmarks: relative error, eager / device / CUDA-graph timings."""
from __future__ import annotations

import statistics
import time

import torch
import triton


def rel(a, b):
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm()).item()


GRAPH = {}  # name -> extra timings of the same call: device busy ms (profiler), CUDA-graph replay ms (--graph)
USE_GRAPH = False  # a failed capture poisons the CUDA context, so graph replay timing is opt-in (set by --graph)


def bench(fn, name=None):
    """Eager median ms (``do_bench``, L2 flushed between calls: host launch cost included when it exceeds the
    device time). With a name, also the device busy time (sum of kernel times, torch.profiler), the host time
    per call (``host_ms``) and, with --graph, the CUDA-graph replay median."""
    ms = triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median")
    if name is not None:
        GRAPH[f"{name}_device"] = kernel_breakdown(fn)[0]
        GRAPH[f"{name}_host"] = host_ms(fn)
        if USE_GRAPH:
            GRAPH[f"{name}_graph"] = triton.testing.do_bench_cudagraph(fn, rep=50, return_mode="median")
    return ms


def host_ms(fn, n=50):
    """Host (CPU) ms per call: median over n calls of the time until ``fn`` returns, each started on an idle GPU
    (synchronize before the call, not inside the timed span), so a full launch queue or the GPU's progress
    cannot block it. Eager time ~ max(device, host)."""
    fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(n):
        torch.cuda.synchronize()
        t = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t) * 1e3)
    torch.cuda.synchronize()
    return round(statistics.median(times), 4)


def kernel_breakdown(fn, n=10, top=8):
    """(total, top kernels): device ms per call of the kernels that ``fn`` launches (torch.profiler)."""
    from torch.profiler import ProfilerActivity, profile

    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(n):
            fn()
        torch.cuda.synchronize()
    out = {}
    for e in prof.key_averages():
        t = getattr(e, "device_time_total", None) or getattr(e, "cuda_time_total", 0)
        if t:
            out[e.key[:60]] = round(t / n / 1000, 4)
    return round(sum(out.values()), 4), dict(sorted(out.items(), key=lambda kv: -kv[1])[:top])


def fwd_bwd(f, inputs, dy):
    def run():
        # fresh leaves per call: autograd nodes are then made on the current stream (graph capture needs it)
        ins = [t.detach().requires_grad_() for t in inputs]
        torch.autograd.grad(f(*ins), ins, dy)
    return run


def fmt(x, p=3):
    """A table cell: ``x`` with ``p`` decimals, "-" when missing."""
    return "-" if x is None else f"{x:.{p}f}"
