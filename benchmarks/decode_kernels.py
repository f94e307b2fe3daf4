"""Where a graphed decode step's time goes, kernel by kernel, against the memory bound: every kernel of a based-1.3b
decode step (batch 128) timed alone at its decode shape, with the bytes it must move and the bandwidth it reaches.

    python benchmarks/decode_kernels.py --json "$OUT/decode_kernels.json"   # GPU, ~1-2 min
    python benchmarks/decode_kernels.py --config configs/tiny.yaml --batch 4 --quick   # small shapes (GPU)

Decode is memory-bound: at batch 128 each step reads every weight once (2.7 GB for based-1.3b) and each sequence's
state once (and writes the Taylor and conv states). The step's 3.7 ms on an H100 (docs/benchmarks.md) is about
twice that bound; this script says which kernels lose the time. Each row is one kind of kernel call:

* GEMMs: ``F.linear`` at M = batch on every projection shape of the model (C in / out, L qkv / proj, S qkv / proj,
  MLP fc1 / fc2, the output layer), bf16, with cuBLAS (torch's default) and with cuBLASLt
  (``torch.backends.cuda.preferred_blas_library("cublaslt")``), and for the narrow ones (N <= 2 d) the same
  product with the operands swapped and split over K (2 / 4 / 8 fp32 partial products, summed);
* the state kernels as the model calls them: ``taylor_linear_attention_step`` (in place; unbuffered, and with the
  decode buffer of 8 / 16 / 32 tokens that the model uses while ``ops.STEP_BUFFER`` > 0), ``sliding_window_step``,
  ``base_conv_packed_step`` (in place) and ``add_rms_norm``, and the Taylor and SWA steps' launch configurations
  (``ops.STEP_INPLACE`` and ``ops.STEP_BUFFERED``: value block BV x warps; ``ops.STEP``: slot block BR x warps x
  V_EARLY) beside the default.

Timing: each row's call is captured ``--reps`` times in one CUDA graph, each time on its own copy of the weights /
states (enough copies to exceed the L2 cache, so every call reads from HBM as in a real step, where 36 layers'
weights pass through), and the graph's replay is timed with CUDA events (median of ``--iters``). "GB/s" is the
bytes a call must move (weights or states read, states written, activations) over its time; "% of copy" is that
against a device-to-device copy's bandwidth measured in the same process (the practical peak). "per step" is the
time x calls per decode step, so the rows add up to an estimate of the step's device time.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

L2_BYTES = 60 << 20  # above the H100's 50 MB / H200's 60 MB L2: copies are cycled until their bytes exceed 4x this


def graph_ms(calls, iters: int) -> float:
    """Median ms per call of ``calls`` (a list of closures, each on its own buffers) replayed in one CUDA graph."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for c in calls[:2]:  # warm-up: Triton compilation and cuBLAS workspace outside the capture
            c()
    torch.cuda.current_stream().wait_stream(stream)
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for c in calls:
            c()
    g.replay()
    torch.cuda.synchronize()
    times = []
    for _ in range(iters):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        g.replay()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b) / len(calls))
    return statistics.median(times)


def copies(bytes_per_copy: int, reps: int) -> int:
    """How many buffer copies a row needs so that one pass over them exceeds 4x the L2 (at least 2, at most reps)."""
    return max(2, min(reps, -(-4 * L2_BYTES // max(1, bytes_per_copy))))


def copy_bandwidth(iters: int, warm_s: float = 0.5) -> tuple[float, float]:
    """GB/s of a 1 GiB device-to-device copy (read + write): ``(cold, warm)``, timed first as the process's first
    GPU work and again after ``warm_s`` seconds of copies. The row percentages use the warm one: a GPU out of idle
    may run its first milliseconds at lower clocks (the cold number shows by how much)."""
    src = torch.empty(1 << 28, dtype=torch.float32, device="cuda")
    dst = torch.empty_like(src)
    cold = graph_ms([lambda: dst.copy_(src)], iters)
    end = time.perf_counter() + warm_s
    while time.perf_counter() < end:
        for _ in range(10):
            dst.copy_(src)
        torch.cuda.synchronize()
    warm = graph_ms([lambda: dst.copy_(src)], max(iters, 50))
    return tuple(2 * src.numel() * 4 / ms / 1e6 for ms in (cold, warm))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default=str(REPO / "configs/based-1.3b.yaml"))
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--reps", type=int, default=32, help="calls per graph (each on its own buffers, cycled)")
    p.add_argument("--iters", type=int, default=20)
    p.add_argument("--quick", action="store_true", help="fewer repetitions (a smoke run)")
    p.add_argument("--only", help="comma-separated row groups among gemm, taylor, swa, conv, norm [all]")
    p.add_argument("--json", help="write the rows here")
    args = p.parse_args(argv)
    groups = {"gemm", "taylor", "swa", "conv", "norm"}
    only = set(args.only.split(",")) if args.only else groups
    if only - groups:
        p.error(f"--only: unknown groups {sorted(only - groups)}; use among {sorted(groups)}")
    if not torch.cuda.is_available():
        p.error("needs a GPU (CUDA graphs and the Triton kernels at decode shapes)")
    if args.quick:
        args.reps, args.iters = 4, 3

    import yaml

    import based_kernels
    from based_kernels.short_conv import base_conv_packed_step
    from based_kernels.taylor_attention import feature_dim, ops as taylor_ops

    m = yaml.safe_load(Path(args.config).read_text())["model"]
    pat = m["layer_pattern"]
    d, H, f = m["hidden_size"], m["num_attention_heads"], m["feature_dim"]
    dh, ffn, W = d // H, m["ffn_hidden_size"], m["swa_window"]
    k = m.get("conv_kernel_size", 3)
    div = m.get("make_vocab_size_divisible_by", 128)
    vocab = -(-m["vocab_size"] // div) * div
    B, dt, dev = args.batch, torch.bfloat16, "cuda"
    n = {c: pat.count(c) for c in "CLSA"}
    layers = len(pat)
    torch.manual_seed(0)
    cold, peak = copy_bandwidth(args.iters)
    print(f"copy bandwidth: {peak:.0f} GB/s ({cold:.0f} GB/s as the process's first GPU work)", flush=True)
    rows = []

    def row(name, per_step, nbytes, ms, **extra):
        r = {"name": name, "calls_per_step": per_step, "bytes": nbytes, "ms": round(ms, 5),
             "gb_s": round(nbytes / ms / 1e6, 1), "pct_of_copy": round(100 * nbytes / ms / 1e6 / peak, 1),
             "ms_per_step": round(ms * per_step, 4), **extra}
        rows.append(r)
        print(f"{name:46s} x{per_step:3d}  {ms * 1e3:8.1f} us  {r['gb_s']:7.0f} GB/s  {r['pct_of_copy']:5.1f}%  "
              f"{r['ms_per_step']:.3f} ms/step" + "".join(f"  {k}={v}" for k, v in extra.items()), flush=True)
        return r

    def time_launch(module, name, value, calls, label):
        """``calls`` graphed and timed with ``module.<name>`` (an op's launch tunable) set to ``value``, then
        restored; None, and the reason printed, when that launch fails (e.g. out of registers)."""
        default = getattr(module, name)
        setattr(module, name, value)
        try:
            return graph_ms(calls, args.iters)
        except Exception as e:
            print(f"{label}: {type(e).__name__}: {str(e)[:200]}")
            return None
        finally:
            setattr(module, name, default)

    # ------------------------------------------------------------------------------------------------- GEMMs
    gemms = [("C linear_in", n["C"], d, 4 * d, True), ("C linear_out", n["C"], 2 * d, d, True),
             ("L linear_qkv", n["L"], d, H * (2 * f + dh), False), ("L linear_proj", n["L"], d, d, False),
             ("S linear_qkv", n["S"], d, 3 * d, False), ("S linear_proj", n["S"], d, d, False),
             ("MLP fc1 (gate + up)", layers, d, 2 * ffn, False), ("MLP fc2", layers, ffn, d, False),
             ("output layer", 1, d, vocab, False)]
    backends = ["cublas", "cublaslt"]
    for name, per_step, K, N, bias in gemms:
        if per_step == 0 or "gemm" not in only:
            continue
        wbytes = N * K * 2
        c = copies(wbytes, args.reps)
        ws = [torch.randn(N, K, device=dev, dtype=dt) * 0.02 for _ in range(c)]
        bs = [torch.randn(N, device=dev, dtype=dt) if bias else None for _ in range(c)]
        x = torch.randn(B, K, device=dev, dtype=dt)
        nbytes = wbytes + (N * 2 if bias else 0) + B * (K + N) * 2
        for backend in backends:
            torch.backends.cuda.preferred_blas_library(backend)
            try:
                ms = graph_ms([lambda w=w, b=b: F.linear(x, w, b) for w, b in zip(ws, bs)], args.iters)
            except Exception as e:  # a backend this build lacks: say so, go on
                print(f"{name} {backend}: {type(e).__name__}: {e}")
                continue
            finally:
                torch.backends.cuda.preferred_blas_library("cublas")
            row(f"{name} [{B}x{K}] x [{K}x{N}]", per_step, nbytes, ms, backend=backend)
        # other ways to the same product where N is small (few output tiles for 132 SMs): the operands swapped
        # (W x^T, a [N, B] result, transposed back), and split-K (s partial products over K / s each, fp32
        # partials summed): more tiles, each reading a part of the weights. Each is checked against F.linear.
        if N <= 2 * d:
            variants = {"W x^T, transposed back": lambda w: torch.mm(w, x.t()).t().contiguous()}
            for sk in (2, 4, 8):
                if K % sk == 0:
                    variants[f"split-K {sk}"] = lambda w, sk=sk: torch.bmm(
                        x.view(B, sk, K // sk).transpose(0, 1), w.view(N, sk, K // sk).permute(1, 2, 0),
                        out_dtype=torch.float32).sum(0)
            ref = F.linear(x, ws[0], bs[0]).float()
            for label, product in variants.items():
                def fn(w, b, product=product):  # the bias as F.linear adds it, the result in the activation dtype
                    return (product(w) if b is None else product(w) + b).to(dt)
                try:
                    err = ((fn(ws[0], bs[0]).float() - ref).norm() / ref.norm()).item()
                    if err > 1e-2:
                        print(f"{name} {label}: relative error {err:.1e} vs F.linear: not timed")
                        continue
                    ms = graph_ms([lambda w=w, b=b, fn=fn: fn(w, b) for w, b in zip(ws, bs)], args.iters)
                except Exception as e:  # e.g. bmm's out_dtype missing in this torch
                    print(f"{name} {label}: {type(e).__name__}: {str(e)[:200]}")
                    continue
                row(f"{name} [{B}x{K}] x [{K}x{N}], {label}", per_step, nbytes, ms, config=label)
        del ws, bs

    # ------------------------------------------------------------------------------------------- state kernels
    if n["L"] and "taylor" in only:
        D = feature_dim(f)
        sbytes = B * H * D * (dh + 1) * 4
        c = copies(sbytes, args.reps)
        states = [(torch.rand(B, H, D, dh, device=dev), torch.rand(B, H, D, device=dev) + 1) for _ in range(c)]
        q, kk = (torch.randn(B, H, f, device=dev, dtype=dt) for _ in range(2))
        v = torch.randn(B, H, dh, device=dev, dtype=dt)
        nbytes = 2 * sbytes + B * H * (2 * f + 2 * dh) * 2
        calls = [lambda s=s: based_kernels.taylor_linear_attention_step(q, kk, v, s, inplace=True) for s in states]
        ms = graph_ms(calls, args.iters)
        row(f"Taylor step, in place (B {B}, H {H}, f {f}, d_v {dh})", n["L"], nbytes, ms, config="default")
        # the kernel's tiles (value block BV, warps) through ops.STEP_INPLACE, the op's launch
        for BV, nw in [(16, 2), (16, 4), (32, 2), (32, 4), (32, 8), (64, 8)]:
            ms = time_launch(taylor_ops, "STEP_INPLACE", (BV, nw, nw), calls, f"Taylor step BV {BV}, {nw} warps")
            if ms is not None:
                row(f"Taylor step kernel, BV {BV}, {nw} warps", n["L"], nbytes, ms, config=f"BV{BV}-w{nw}")
        # the buffered step (what the model runs while ops.STEP_BUFFER > 0): a buffer of C tokens per state copy,
        # the copies' fill levels spread over 0..C so a replay averages the C + 1 steps of a cycle (C reads of
        # the state and its buffer, one read and write of the state with the fold); bytes per call averaged alike
        # With the read copy (ops.STEP_READ_COPY) the steps between folds read the quadratic rows in bf16.
        P = f * (f + 1) // 2
        qbytes = B * H * P * dh * 2
        sizes = sorted({taylor_ops.STEP_BUFFER, 8, 16, 32} - {0})
        for C, copy in [(C, False) for C in sizes] + [(taylor_ops.STEP_BUFFER, True)] * (taylor_ops.STEP_BUFFER > 0):
            calls_n = max(len(states), C + 1)  # the states cycled, each call with its own buffer and fill level
            bufs = [(torch.randn(B, H, C, f, device=dev, dtype=dt), torch.randn(B, H, C, dh, device=dev, dtype=dt),
                     torch.full((B, H), i % (C + 1), device=dev, dtype=torch.int32))
                    + ((torch.randn(B, H, P, dh, device=dev, dtype=dt),) if copy else ()) for i in range(calls_n)]
            calls = [lambda s=states[i % len(states)], b=b: based_kernels.taylor_linear_attention_step(
                q, kk, v, s, inplace=True, buffer=b) for i, b in enumerate(bufs)]
            read = sbytes - B * H * P * dh * 4 + qbytes if copy else sbytes  # a step between folds
            fold = 2 * sbytes + (qbytes if copy else 0)
            nbytes = (C * read + fold) / (C + 1) + B * H * (C / 2 * (f + dh) * 2 + (2 * f + 2 * dh) * 2)
            ms = graph_ms(calls, args.iters)
            name = f"Taylor step, in place, buffer of {C} tokens" + (", bf16 read copy" if copy else "")
            tag = f"buffer{C}" + ("-copy" if copy else "")
            row(name, n["L"], round(nbytes), ms, config=tag)
            # the buffered kernel's tiles (value block BV, warps) through ops.STEP_BUFFERED, at the model's buffer
            for BV, nw in [(16, 4), (32, 4), (64, 4), (128, 4), (128, 8)] * (C == taylor_ops.STEP_BUFFER):
                ms = time_launch(taylor_ops, "STEP_BUFFERED", (BV, nw), calls, f"{name}, BV {BV}, {nw} warps")
                if ms is not None:
                    row(f"{name}, BV {BV}, {nw} warps", n["L"], round(nbytes), ms, config=f"{tag}-BV{BV}-w{nw}")
            del bufs
        del states
    if n["S"] and "swa" in only:
        cbytes = 2 * B * (W + 1) * d * 2
        c = copies(cbytes, args.reps)
        caches = [(torch.randn(B, W + 1, H, dh, device=dev, dtype=dt),
                   torch.randn(B, W + 1, H, dh, device=dev, dtype=dt)) for _ in range(c)]
        q, kk, v = (torch.randn(B, H, dh, device=dev, dtype=dt) for _ in range(3))
        pos = torch.full((B,), 1000, device=dev, dtype=torch.long)
        calls = [lambda kc=kc, vc=vc: based_kernels.sliding_window_step(q, kk, v, kc, vc, pos, window=W)
                 for kc, vc in caches]
        ms = graph_ms(calls, args.iters)
        row(f"SWA step (window {W}, B {B}, H {H}, d {dh})", n["S"], cbytes + 4 * B * d * 2, ms, config="default")
        # the kernel's slot block BR, warps and V_EARLY through ops.STEP, the op's launch
        from based_kernels.sliding_window import ops as swa_ops
        for BR, nw, early in [(16, 2, False), (16, 2, True), (16, 1, True), (32, 1, True), (8, 1, False),
                              (8, 1, True), (8, 2, True), (4, 1, False), (4, 1, True)]:
            v_at = "early" if early else "late"
            ms = time_launch(swa_ops, "STEP", (BR, nw, early), calls, f"SWA step BR {BR}, {nw} warps, V {v_at}")
            if ms is not None:
                row(f"SWA step kernel, BR {BR}, {nw} warps, V {v_at}", n["S"], cbytes + 4 * B * d * 2, ms,
                    config=f"BR{BR}-w{nw}-{v_at}")
        del caches
    if n["C"] and "conv" in only:
        C = 2 * d
        sbytes = B * (k - 1) * C * 2
        c = copies(sbytes, args.reps)
        states = [torch.randn(B, k - 1, C, device=dev, dtype=dt) for _ in range(c)]
        u = torch.randn(B, 2 * C, device=dev, dtype=dt)
        w = torch.randn(C, k, device=dev, dtype=dt)
        bias = torch.randn(2 * C, device=dev, dtype=dt)
        ms = graph_ms([lambda s=s: base_conv_packed_step(u, w, s, bias, inplace=True)
                       for s in states], args.iters)
        row(f"BaseConv conv step, in place (B {B}, channels {C})", n["C"], 2 * sbytes + B * 3 * C * 2, ms)
    if "norm" in only:
        x = torch.randn(B, d, device=dev, dtype=dt)
        res = [torch.randn(B, d, device=dev, dtype=torch.float32) for _ in range(args.reps)]
        w = torch.ones(d, device=dev, dtype=dt)
        ms = graph_ms([lambda r=r: based_kernels.add_rms_norm(x, r, w, 1e-5) for r in res], args.iters)
        row(f"add_rms_norm (B {B}, d {d}, fp32 residual)", 2 * layers, B * d * (2 + 4 + 4 + 2), ms)

    best_gemm = {}
    for r in rows:
        if "backend" in r:
            key = r["name"]
            best_gemm[key] = min(best_gemm.get(key, r["ms_per_step"]), r["ms_per_step"])
    default = sum(r["ms_per_step"] for r in rows if r.get("backend") == "cublas") + sum(
        r["ms_per_step"] for r in rows if "backend" not in r and r.get("config", "default") == "default")
    cublas = sum(r["ms_per_step"] for r in rows if r.get("backend") == "cublas")
    print(f"\nsum of the rows (cuBLAS, default kernels): {default:.3f} ms per step; with each GEMM's faster "
          f"backend: {default - cublas + sum(best_gemm.values()):.3f} ms; copy bandwidth {peak:.0f} GB/s")
    if args.json:
        out = {"meta": {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "config": args.config,
                        "batch": B, "copy_gb_s": round(peak, 1), "copy_gb_s_cold": round(cold, 1),
                        "date": time.strftime("%Y-%m-%d"), "sum_ms_per_step_default": round(default, 4)},
               "rows": rows}
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(out, indent=1))
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
