"""Host (Python + launch) time of the eager sliding-window attention call path, measured on a CPU without a GPU.

The kernels really compile for sm_90 (ptxas ships with triton) under a stand-in Triton driver whose C launcher is
a no-op (the technique of ``tests/kernels/test_launcher.py``); tensors live on the CPU. Everything the GPU
benchmark's eager call does on the host runs: the public op's validation, the autograd Function, the output
allocations, the ``Launcher`` keys and argument tuples, and for fwd+bwd ``bench_utils.fwd_bwd`` exactly (fresh
leaves, ``torch.autograd.grad``). Not measured: the real C launcher (~5-10 us per launch on a GPU host) and the
CUDA caching allocator (CPU ``torch.empty`` of the same sizes stands in for it).

    python benchmarks/swa_host.py [--shape B,T,H,D,W] [--n 200] [--profile]

Prints the host us per call of the forward and of fwd+bwd, then (``--profile``) a cProfile breakdown per phase
and the top functions by own time; "floor" rows time an autograd.Function that only allocates the same outputs
(no checks, no launches) through the same calls: what PyTorch's autograd costs any custom op here. First run: ~1 min of compiles (cached in ~/.triton afterwards).
"""
from __future__ import annotations

import argparse
import cProfile
import os
import pstats
import statistics
import time

os.environ.pop("TRITON_INTERPRET", None)  # the real (compiled) launch path, not the interpreter

import torch  # noqa: E402


def install_fake_driver():
    """A stand-in CUDA driver (sm_90 target, device 0, stream 0) whose kernels' C launcher does nothing."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import compiler
    from triton.runtime.autotuner import Autotuner
    from triton.runtime.driver import driver

    class FakeDriver:
        launcher_cls = None

        def get_current_device(self):
            return 0

        def get_current_stream(self, device=None):
            return 0

        def get_current_target(self):
            return GPUTarget("cuda", 90, 32)

        def get_active_torch_device(self):
            return torch.device("cpu")

    def init_handles(self):  # no cubin load; launches are no-ops
        if self.module is None:
            self._run = lambda *a: None
            self.module, self.function = 1, 0

    compiler.CompiledKernel._init_handles = init_handles
    driver.set_active(FakeDriver())
    Autotuner._bench = lambda self, *a, config, **k: [float(self.configs.index(config))]  # first config wins


def time_us(fn, n, reps=15):
    """(min, median) over ``reps`` of the mean us per call of ``n`` back-to-back calls, in CPU time of this thread
    (the autograd engine runs CPU tensors' backward on the calling thread): other processes on a shared VM
    then add little, and the min is the number to compare."""
    fn()
    times = []
    for _ in range(reps):
        t = time.thread_time()
        for _ in range(n):
            fn()
        times.append((time.thread_time() - t) / n * 1e6)
    return min(times), statistics.median(times)


# cProfile rows -> phase, by (file fragment or builtin name fragment); first match wins
PHASES = [
    ("launch (no-op C launcher + stream/device)", ("<lambda>", "get_current_stream", "get_current_device")),
    ("Launcher key + args", ("_common.py", "data_ptr", "'dtype'", "stride", "method 'get' of 'dict'")),
    ("allocation", ("torch.empty", "empty_like", "new_empty", "transpose", "zeros")),
    ("autograd (Function, engine, leaves)", ("autograd", "function.py", "run_backward", "detach", "requires_grad_",
                                             "_functions", "apply")),
    ("validation (public op)", ("(sliding_window_attention)", "resolve_backend", "check_backend", "isinstance")),
    ("SWA glue (ops.py)", ("sliding_window/ops.py",)),
]


class _Floor(torch.autograd.Function):
    """The least any custom-kernel autograd op costs on this path: the same allocations, no launches, no checks."""

    @staticmethod
    def forward(ctx, q, k, v):
        B, T, H, _ = q.shape
        o, lse = q.new_empty(q.shape), q.new_empty((B, H, T), dtype=torch.float32)
        ctx.save_for_backward(q, k, v, o, lse)
        return o

    @staticmethod
    def backward(ctx, do):
        q, k, v, o, lse = ctx.saved_tensors
        return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


def profile(fn, n, top):
    pr = cProfile.Profile()
    fn()
    pr.enable()
    for _ in range(n):
        fn()
    pr.disable()
    st = pstats.Stats(pr)
    phases, rows = {}, []
    for (file, line, name), (cc, nc, tt, ct, callers) in st.stats.items():
        label = f"{os.path.relpath(file) if not file.startswith('~') else ''}:{line}({name})"
        us = tt / n * 1e6
        rows.append((us, nc / n, label))
        phase = next((p for p, keys in PHASES if any(k in label for k in keys)), "other (torch / python)")
        phases[phase] = phases.get(phase, 0.0) + us
    total = sum(phases.values())
    print(f"  cProfile (own time, us per call, profiler overhead included; total {total:.1f}):")
    for p, us in sorted(phases.items(), key=lambda kv: -kv[1]):
        print(f"    {us:7.1f}  {100 * us / total:4.1f}%  {p}")
    print(f"  top {top} functions by own time (us per call, calls per call):")
    for us, calls, label in sorted(rows, reverse=True)[:top]:
        print(f"    {us:7.1f} {calls:5.1f}  {label[-110:]}")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--shape", default="8,4096,16,64,128", help="B,T,H,D,W (default: the issue-5 goal shape)")
    ap.add_argument("--n", type=int, default=100, help="calls per timing repetition")
    ap.add_argument("--profile", action="store_true", help="also print a cProfile breakdown")
    ap.add_argument("--top", type=int, default=25)
    ap.add_argument("--device", default="cpu", choices=["meta", "cpu"],
                    help="cpu (default): real tensors; at the goal shape each 64 MB tensor is a mmap + munmap (~17 us "
                         "more than a CUDA caching-allocator hit, ~3 us at B2); meta: no storage, but PyTorch runs "
                         "Python meta functions for some ops (empty_like, new_empty)")
    args = ap.parse_args()
    install_fake_driver()

    import based_kernels
    from based_kernels import sliding_window_attention
    from bench_utils import fwd_bwd

    based_kernels.use_backend("triton")  # CPU tensors: route to the Triton path as a CUDA tensor would
    B, T, H, D, W = (int(x) for x in args.shape.split(","))
    torch.manual_seed(0)
    q, k, v = (torch.randn(B, T, H, D, dtype=torch.bfloat16, device=args.device,
                             requires_grad=True) for _ in range(3))
    do = torch.randn(B, T, H, D, dtype=torch.bfloat16, device=args.device)
    ours = lambda q, k, v: sliding_window_attention(q, k, v, window=W)  # noqa: E731  (as the GPU benchmark)
    cases = [("fwd", lambda: ours(q, k, v)), ("fwd+bwd", fwd_bwd(ours, [q, k, v], do)),
             ("floor fwd", lambda: _Floor.apply(q, k, v)), ("floor fwd+bwd", fwd_bwd(_Floor.apply, [q, k, v], do))]

    t = time.perf_counter()
    for _, fn in cases:
        fn()  # compiles / autotunes on the first call of each kernel
    print(f"warm-up (compile + autotune, or the triton cache): {time.perf_counter() - t:.1f} s")
    print(f"B{B} T{T} H{H} D{D} W{W} bf16, {args.device} tensors, stand-in driver; torch {torch.__version__}")
    for name, fn in cases:
        best, med = time_us(fn, args.n)
        print(f"{name}: {best:.1f} us host per call (min of 15 x {args.n}; median {med:.1f})")
        if args.profile and not name.startswith("floor"):
            profile(fn, args.n, args.top)


if __name__ == "__main__":
    main()
