"""BaseConv core ``SiLU(causal_depthwise_conv(u1)) * u2``: based_kernels (one fused Triton pass) vs eager PyTorch
(``F.conv1d`` in its native [B, C, T] layout, then SiLU and the gate) and fla ``causal_conv1d`` (+ eager gate),
forward and forward+backward, bf16, median ms of ``triton.testing.do_bench`` (eager), the device busy time
(torch.profiler: kernel time only) and the host time per call, with effective TB/s for eager and device times.

Effective bytes: forward reads u1, u2 and writes y (6 bytes per element in bf16); forward+backward adds reading
u1, u2, dy and writing du1, du2 (16 bytes per element in all). Correctness against the fp64 reference first.

The mixer's packed op (``base_conv_packed``: u = [u1 | u2] in one tensor, the in-projection bias added in the
kernel, one du and dbias) is timed too (``packed_*``: same effective bytes; the bias is negligible), next to
the unfused formulation it replaces (``unfused_bias_*``: ``(u + b).chunk(2)`` -> base_conv, whose backward adds
the cat of du1, du2 and the bias-gradient reduction). ``--bwd-variant tile|stream`` picks the backward kernel.

    python benchmarks/base_conv.py [--out benchmarks/results/base_conv.json] [--budget-s S] [--bwd-variant V]
        [--only-ours]

Cases in priority order (goal shape, channel sizes and k, Megatron layout, then a T sweep 2k-32k at B*T = 32k).
"""
from __future__ import annotations

import argparse
import datetime
import json
import platform
import time

import torch
import torch.nn.functional as F
import triton

from based_kernels import base_conv
from based_kernels.short_conv import base_conv_packed, base_conv_reference, ops

import bench_utils
from bench_utils import GRAPH, bench, fmt, fwd_bwd, kernel_breakdown, rel


def fla_conv():
    try:
        from fla.modules.causal_conv1d import causal_conv1d
        return causal_conv1d
    except Exception as e:  # noqa: BLE001
        print(f"fla unavailable: {e!r}")
        return None


def run_case(B, T, C, K, layout, fla_fn, only_ours=False):
    torch.manual_seed(0)
    if layout == "megatron":  # u1, u2 = column halves of the [s, b, 2C] in-projection, seen as [b, s, C]
        u = torch.randn(T, B, 2 * C, device="cuda", dtype=torch.bfloat16).transpose(0, 1)
    else:
        u = torch.randn(B, T, 2 * C, device="cuda", dtype=torch.bfloat16)
    u1, u2 = u[..., :C], u[..., C:]  # for the u1, u2 API: strided halves (before: two tensors when contiguous)
    if layout == "contiguous":
        u1, u2 = u1.contiguous(), u2.contiguous()
    u1.requires_grad_()
    u2.requires_grad_()
    w = (torch.rand(C, K, device="cuda") * 2 - 1) / K**0.5
    w.requires_grad_()
    dy = torch.randn(B, T, C, device="cuda", dtype=torch.bfloat16)
    n = B * T * C
    row = dict(B=B, T=T, C=C, K=K, layout=layout)

    y, _ = base_conv(u1, u2, w)
    grads = torch.autograd.grad(y, [u1, u2, w], dy)
    ins = [t.detach()[:1].double().requires_grad_() for t in (u1, u2)] + [w.detach().double().requires_grad_()]
    y_ref, _ = base_conv_reference(*ins)
    g_ref = torch.autograd.grad(y_ref, ins, dy[:1].double())
    row["err_vs_reference"] = max(rel(y[:1], y_ref), rel(grads[0][:1], g_ref[0]), rel(grads[1][:1], g_ref[1]))
    assert row["err_vs_reference"] < 1e-2, row

    ours = lambda: base_conv(u1, u2, w)[0]  # noqa: E731
    ours_fb = fwd_bwd(lambda a, b, c: base_conv(a, b, c)[0], [u1, u2, w], dy)
    row["ours_fwd_ms"] = bench(ours, "ours_fwd")
    row["ours_fwdbwd_ms"] = bench(ours_fb, "ours_fwdbwd")
    row["ours_kernels_fwdbwd_ms"] = kernel_breakdown(ours_fb)[1]
    row["ours_fwd_TBps"] = 6 * n / row["ours_fwd_ms"] * 1e-9
    row["ours_fwdbwd_TBps"] = 16 * n / row["ours_fwdbwd_ms"] * 1e-9

    # the mixer's packed op (bias inside) vs the unfused formulation it replaces
    u = u.detach().requires_grad_()
    b = (torch.randn(2 * C, device="cuda", dtype=torch.bfloat16) * 0.1).requires_grad_()
    yp, _ = base_conv_packed(u, w, b)
    gp = torch.autograd.grad(yp, [u, w, b], dy)
    ins = [u.detach()[:1].double().requires_grad_(), w.detach().double().requires_grad_(),
           b.detach().double().requires_grad_()]
    uu = ins[0] + ins[2]
    y_ref, _ = base_conv_reference(uu[..., :C], uu[..., C:], ins[1])
    g_ref = torch.autograd.grad(y_ref, ins, dy[:1].double())
    # batch row 0 only (dweight and dbias sum over the batch: tests/kernels/test_short_conv.py checks them)
    row["packed_err_vs_reference"] = max(rel(yp[:1], y_ref), rel(gp[0][:1], g_ref[0]))
    assert row["packed_err_vs_reference"] < 2e-2, row
    packed_fb = fwd_bwd(lambda a, c, d: base_conv_packed(a, c, d)[0], [u, w, b], dy)
    unfused_fb = fwd_bwd(lambda a, c, d: base_conv(*(a + d).chunk(2, dim=-1), c)[0], [u, w, b], dy)
    row["packed_fwd_ms"] = bench(lambda: base_conv_packed(u, w, b)[0], "packed_fwd")
    row["packed_fwdbwd_ms"] = bench(packed_fb, "packed_fwdbwd")
    row["packed_kernels_fwdbwd_ms"] = kernel_breakdown(packed_fb)[1]
    row["unfused_bias_fwdbwd_ms"] = bench(unfused_fb, "unfused_bias_fwdbwd")
    row["packed_fwd_TBps"] = 6 * n / row["packed_fwd_ms"] * 1e-9
    row["packed_fwdbwd_TBps"] = 16 * n / row["packed_fwdbwd_ms"] * 1e-9
    row["bwd_variant"] = ops.BWD_VARIANT
    if only_ours:
        return _finish(row, n)

    # eager PyTorch in its own [B, C, T] layout (no transposes charged to it)
    x_bct = u1.detach().transpose(1, 2).contiguous().requires_grad_()
    g_bct = u2.detach().transpose(1, 2).contiguous().requires_grad_()
    dy_bct = dy.transpose(1, 2).contiguous()
    w_conv = w.detach().to(torch.bfloat16)[:, None].requires_grad_()
    conv = lambda: F.conv1d(x_bct, w_conv, padding=K - 1, groups=C)[..., :T]  # noqa: E731
    eager = lambda: F.silu(conv()) * g_bct  # noqa: E731
    row["eager_err_vs_ours"] = rel(eager().transpose(1, 2), y)
    assert row["eager_err_vs_ours"] < 2e-2, row
    row["conv1d_only_fwd_ms"] = bench(conv)
    row["eager_fwd_ms"] = bench(eager, "eager_fwd")
    eager_fn = lambda x, g, w_: F.silu(F.conv1d(x, w_, padding=K - 1, groups=C)[..., :T]) * g  # noqa: E731
    row["eager_fwdbwd_ms"] = bench(fwd_bwd(eager_fn, [x_bct, g_bct, w_conv], dy_bct), "eager_fwdbwd")
    if fla_fn is not None:
        x_c, g_c = u1.detach().contiguous().requires_grad_(), u2.detach().contiguous().requires_grad_()
        w_f = w.detach().clone().requires_grad_()
        fla_only = lambda: fla_fn(x_c, w_f, activation="silu")[0]  # noqa: E731
        fla_gate = lambda: fla_only() * g_c  # noqa: E731
        try:
            row["fla_err_vs_ours"] = rel(fla_gate(), y)
            assert row["fla_err_vs_ours"] < 2e-2, row
            row["fla_conv_only_fwd_ms"] = bench(fla_only)
            row["fla_fwd_ms"] = bench(fla_gate, "fla_fwd")
            fla_fn2 = lambda x, g, w_: fla_fn(x, w_, activation="silu")[0] * g  # noqa: E731
            row["fla_fwdbwd_ms"] = bench(fwd_bwd(fla_fn2, [x_c, g_c, w_f], dy), "fla_fwdbwd")
            row["fla_conv_only_fwd_TBps"] = 4 * n / row["fla_conv_only_fwd_ms"] * 1e-9
        except Exception as e:  # noqa: BLE001
            row["fla_error"] = repr(e)[:200]
    return _finish(row, n)


def _finish(row, n):
    row.update({f"{k}_ms": v for k, v in GRAPH.items()})
    GRAPH.clear()
    for kind in ("_device", "_graph"):
        for m, nbytes in (("fwd", 6 * n), ("fwdbwd", 16 * n)):
            for p in ("ours", "packed"):
                if f"{p}_{m}{kind}_ms" in row:
                    row[f"{p}_{m}{kind}_TBps"] = nbytes / row[f"{p}_{m}{kind}_ms"] * 1e-9
    for p in ("eager", "fla"):
        for m in ("fwd", "fwdbwd"):
            for kind in ("", "_device", "_graph"):
                if f"{p}_{m}{kind}_ms" in row and f"ours_{m}{kind}_ms" in row:
                    row[f"speedup_{m}{kind}_vs_{p}"] = row[f"{p}_{m}{kind}_ms"] / row[f"ours_{m}{kind}_ms"]
    from based_kernels.short_conv.backward import conv_bwd_kernel, conv_bwd_stream_kernel
    from based_kernels.short_conv.forward import conv_fwd_kernel

    row["configs"] = {kern.fn.__name__: str(getattr(kern, "best_config", None))
                      for kern in (conv_fwd_kernel, conv_bwd_kernel, conv_bwd_stream_kernel)}
    return row


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="benchmarks/results/base_conv.json")
    ap.add_argument("--cases", default=None, help="B,T,C,K,layout;... instead of the default list")
    ap.add_argument("--no-fla", action="store_true")
    ap.add_argument("--graph", action="store_true", help="also time CUDA-graph replays")
    ap.add_argument("--budget-s", type=float, default=1e9, help="stop starting new cases after this many seconds")
    ap.add_argument("--bwd-variant", choices=["tile", "stream"], default=None,
                    help="backward kernel (default: BASED_CONV_BWD or the library default)")
    ap.add_argument("--only-ours", action="store_true", help="skip the eager and fla baselines")
    args = ap.parse_args()
    if args.bwd_variant:
        ops.BWD_VARIANT = args.bwd_variant
    bench_utils.USE_GRAPH = args.graph
    fla_fn = None if args.no_fla else fla_conv()
    try:
        import fla
        fla_version = getattr(fla, "__version__", "?")
    except Exception:  # noqa: BLE001
        fla_version = None
    meta = dict(gpu=torch.cuda.get_device_name(), torch=torch.__version__, triton=triton.__version__,
                fla=fla_version, python=platform.python_version(), date=datetime.date.today().isoformat(),
                dtype="bfloat16", timing="triton.testing.do_bench median (ms)", bwd_variant=ops.BWD_VARIANT)
    cases = [(8, 4096, 1024, 3, "contiguous"), (8, 4096, 2048, 3, "contiguous"), (8, 4096, 2048, 3, "megatron"),
             (4, 4096, 3584, 3, "megatron"), (8, 4096, 2048, 2, "contiguous"), (8, 4096, 2048, 4, "contiguous"),
             (16, 2048, 2048, 3, "megatron"), (4, 8192, 2048, 3, "megatron"), (2, 16384, 2048, 3, "megatron"),
             (1, 32768, 2048, 3, "megatron")]
    if args.cases:
        cases = [tuple(int(x) for x in c.split(",")[:4]) + (c.split(",")[4],) for c in args.cases.split(";")]
    rows, t0 = [], time.time()
    for case in cases:
        if time.time() - t0 > args.budget_s:
            print(f"budget reached: skipping {case}")
            continue
        row = run_case(*case, None if args.only_ours else fla_fn, args.only_ours)
        rows.append(row)
        print(json.dumps(row), flush=True)
        with open(args.out, "w") as f:
            json.dump(dict(meta=meta, rows=rows), f, indent=1)
    print(f"\n{meta['gpu']}, torch {meta['torch']}, triton {meta['triton']}, fla {fla_version}, bf16, median ms")
    for kind, title in bench_utils.timing_kinds():
        print(f"\n{title}, ms (fwd / fwd+bwd); TB/s effective")
        print("| B | T | C | k | layout | ours | ours TB/s | eager conv1d+SiLU+gate | fla causal_conv1d + gate | "
              "speedup vs eager | vs fla |")
        print("|---|---|---|---|---|---|---|---|---|---|---|")
        for r in rows:
            cell = lambda p: f"{fmt(r.get(f'{p}_fwd{kind}_ms'))} / {fmt(r.get(f'{p}_fwdbwd{kind}_ms'))}"  # noqa: E731
            sp = lambda p: (f"{fmt(r.get(f'speedup_fwd{kind}_vs_{p}'), 2)}x / "  # noqa: E731
                            f"{fmt(r.get(f'speedup_fwdbwd{kind}_vs_{p}'), 2)}x")
            tb = f"{fmt(r.get(f'ours_fwd{kind}_TBps'), 2)} / {fmt(r.get(f'ours_fwdbwd{kind}_TBps'), 2)}"
            print(f"| {r['B']} | {r['T']} | {r['C']} | {r['K']} | {r['layout']} | {cell('ours')} | {tb} | "
                  f"{cell('eager')} | {cell('fla')} | {sp('eager')} | {sp('fla')} |")
    print(f"\npacked op (u = [u1 | u2] + bias inside, one du + dbias), bwd variant {ops.BWD_VARIANT}: ms fwd / "
          "fwd+bwd (TB/s); the unfused (u + b).chunk -> base_conv fwd+bwd; device fwd+bwd")
    print("| B | T | C | k | layout | packed | packed TB/s | unfused+bias fwd+bwd | packed device fwd+bwd (TB/s) |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['B']} | {r['T']} | {r['C']} | {r['K']} | {r['layout']} | {fmt(r.get('packed_fwd_ms'))} / "
              f"{fmt(r.get('packed_fwdbwd_ms'))} | {fmt(r.get('packed_fwd_TBps'), 2)} / "
              f"{fmt(r.get('packed_fwdbwd_TBps'), 2)} | {fmt(r.get('unfused_bias_fwdbwd_ms'))} | "
              f"{fmt(r.get('packed_fwdbwd_device_ms'))} ({fmt(r.get('packed_fwdbwd_device_TBps'), 2)}) |")
    for r in rows:
        print(r["C"], r["K"], r["layout"], "ours kernels (fwd+bwd):", r.get("ours_kernels_fwdbwd_ms"))
        print(r["C"], r["K"], r["layout"], "packed kernels (fwd+bwd):", r.get("packed_kernels_fwdbwd_ms"))


if __name__ == "__main__":
    main()
