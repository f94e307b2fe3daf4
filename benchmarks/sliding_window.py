"""Sliding-window attention: based_kernels (Triton) vs FlexAttention (compiled, sliding-window block mask) and fla
``parallel_attn(window_size=W + 1)``, forward and forward+backward, bf16, median ms of ``triton.testing.do_bench``
(eager), plus for each method the device busy time (torch.profiler) and the host time per call.

Correctness first: our kernel against the fp32 dense reference on a slice (B=1) of each shape, and every peer
against our output at the full shape, before anything is timed. Prints a table, writes JSON.

    python benchmarks/sliding_window.py [--quick] [--out benchmarks/results/sliding_window.json] [--budget-s S]
        [--bwd fused,fused@512]   # also our fwd+bwd with other backwards (ops.BWD[@ops.STRIP]), same process


Cases run in priority order (goal shape first, then d 128 / 112, the W grid, the T sweep at B*T = 32k), so a
time budget cuts the least important ones.
"""
from __future__ import annotations

import argparse
import datetime
import json
import platform
import time

import torch
import triton

from based_kernels import sliding_window_attention
from based_kernels.sliding_window import ops as swa_ops
from based_kernels.sliding_window import sliding_window_attention_reference

import bench_utils
from bench_utils import GRAPH, bench, fmt, fwd_bwd, kernel_breakdown, rel


def make_flex(B, H, T, W):
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    def sliding_window(b, h, q_idx, kv_idx):
        return (q_idx >= kv_idx) & (q_idx - kv_idx <= W)

    mask = create_block_mask(sliding_window, B=None, H=None, Q_LEN=T, KV_LEN=T, device="cuda")
    compiled = torch.compile(flex_attention, dynamic=False)
    return lambda q, k, v: compiled(q, k, v, block_mask=mask)  # [B, H, T, D]


def fla_attn():
    try:
        from fla.ops.attn.parallel import parallel_attn
        import fla
        return parallel_attn, getattr(fla, "__version__", "?")
    except Exception as e:  # noqa: BLE001  (fla not installed or broken: leave the column empty)
        print(f"fla unavailable: {e!r}")
        return None, None


def run_case(B, T, H, D, W, peers, fla_fn, bwd_variants=()):
    torch.manual_seed(0)
    q, k, v = (torch.randn(B, T, H, D, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
    do = torch.randn(B, T, H, D, device="cuda", dtype=torch.bfloat16)
    ours = lambda q, k, v: sliding_window_attention(q, k, v, window=W)  # noqa: E731
    row = dict(B=B, T=T, H=H, D=D, W=W)

    # correctness: ours vs the dense fp32 reference on batch row 0 (T^2 memory), forward and gradients
    sl = [t[:1, : min(T, 4096)].detach().requires_grad_() for t in (q, k, v)]
    o = ours(*sl)
    g = torch.autograd.grad(o, sl, do[:1, : sl[0].shape[1]])
    sr = [t.detach().float().requires_grad_() for t in sl]
    o_ref = sliding_window_attention_reference(*sr, window=W)
    g_ref = torch.autograd.grad(o_ref, sr, do[:1, : sl[0].shape[1]].float())
    row["err_vs_reference"] = max([rel(o, o_ref)] + [rel(a, b) for a, b in zip(g, g_ref)])
    assert row["err_vs_reference"] < 2e-2, row

    o_ours = ours(q, k, v)
    inputs = [q, k, v]
    row["ours_fwd_ms"] = bench(lambda: ours(q, k, v), "ours_fwd")
    row["ours_fwdbwd_ms"] = bench(fwd_bwd(ours, inputs, do), "ours_fwdbwd")
    row["ours_kernels_fwdbwd_ms"] = kernel_breakdown(fwd_bwd(ours, inputs, do))[1]
    # bytes of the forward: q, k, v read once, o written once
    row["ours_fwd_TBps"] = 4 * q.numel() * 2 / row["ours_fwd_ms"] * 1e-9
    default_bwd, default_strip = swa_ops.BWD, swa_ops.STRIP
    for variant in bwd_variants:  # our fwd+bwd with another backward: checked against the reference, then timed
        swa_ops.BWD, _, strip = variant.partition("@")  # "fused@512": the fused backward with ops.STRIP = 512
        swa_ops.STRIP = int(strip) if strip else default_strip
        try:
            gv = torch.autograd.grad(ours(*sl), sl, do[:1, : sl[0].shape[1]])
            row[f"ours_{variant}_err_vs_reference"] = max(rel(a, b) for a, b in zip(gv, g_ref))
            assert row[f"ours_{variant}_err_vs_reference"] < 2e-2, row
            row[f"ours_{variant}_fwdbwd_ms"] = bench(fwd_bwd(ours, inputs, do), f"ours_{variant}_fwdbwd")
            row[f"ours_{variant}_kernels_fwdbwd_ms"] = kernel_breakdown(fwd_bwd(ours, inputs, do))[1]
        finally:
            swa_ops.BWD, swa_ops.STRIP = default_bwd, default_strip

    if "flex" in peers:  # d = 112 is tried too (the error is recorded if Flex rejects it)
        qh, kh, vh = (t.detach().transpose(1, 2).contiguous().requires_grad_() for t in (q, k, v))
        doh = do.transpose(1, 2).contiguous()
        try:
            flex = make_flex(B, H, T, W)
            row["flex_err_vs_ours"] = rel(flex(qh, kh, vh).transpose(1, 2), o_ours)
            assert row["flex_err_vs_ours"] < 2e-2, row
            row["flex_fwd_ms"] = bench(lambda: flex(qh, kh, vh), "flex_fwd")
            row["flex_fwdbwd_ms"] = bench(fwd_bwd(flex, [qh, kh, vh], doh), "flex_fwdbwd")
        except Exception as e:  # noqa: BLE001
            row["flex_error"] = repr(e)[:300]
    if "fla" in peers and fla_fn is not None:
        f = lambda q, k, v: fla_fn(q, k, v, window_size=W + 1)  # noqa: E731  (fla counts the diagonal in W)
        try:
            row["fla_err_vs_ours"] = rel(f(q, k, v), o_ours)
            assert row["fla_err_vs_ours"] < 2e-2, row
            row["fla_fwd_ms"] = bench(lambda: f(q, k, v), "fla_fwd")
            row["fla_fwdbwd_ms"] = bench(fwd_bwd(f, inputs, do), "fla_fwdbwd")
        except Exception as e:  # noqa: BLE001
            row["fla_error"] = repr(e)[:200]
    row.update({f"{k}_ms": v for k, v in GRAPH.items()})
    GRAPH.clear()
    for p in ("flex", "fla"):
        for m in ("fwd", "fwdbwd"):
            for kind in ("", "_device", "_host", "_graph"):
                if f"{p}_{m}{kind}_ms" in row and f"ours_{m}{kind}_ms" in row:
                    row[f"speedup_{m}{kind}_vs_{p}"] = row[f"{p}_{m}{kind}_ms"] / row[f"ours_{m}{kind}_ms"]
                for variant in bwd_variants:
                    if f"{p}_{m}{kind}_ms" in row and f"ours_{variant}_{m}{kind}_ms" in row:
                        row[f"speedup_{variant}_{m}{kind}_vs_{p}"] = (row[f"{p}_{m}{kind}_ms"] /
                                                                      row[f"ours_{variant}_{m}{kind}_ms"])
    from based_kernels.sliding_window.backward import swa_bwd_dkdv_kernel, swa_bwd_dq_kernel
    from based_kernels.sliding_window.backward_fused import swa_bwd_fused_kernel
    from based_kernels.sliding_window.forward import swa_fwd_kernel

    row["configs"] = {kern.fn.__name__: str(kern.best_config) for kern in
                      (swa_fwd_kernel, swa_bwd_dq_kernel, swa_bwd_dkdv_kernel, swa_bwd_fused_kernel)
                      if getattr(kern, "best_config", None) is not None}
    return row


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="benchmarks/results/sliding_window.json")
    ap.add_argument("--quick", action="store_true", help="only the goal shape")
    ap.add_argument("--cases", default=None, help="B,T,H,D,W;B,T,H,D,W;... instead of the default list")
    ap.add_argument("--peers", default="flex,fla")
    ap.add_argument("--budget-s", type=float, default=1e9, help="stop starting new cases after this many seconds")
    ap.add_argument("--graph", action="store_true", help="also time CUDA-graph replays")
    ap.add_argument("--bwd", default="",
                    help="other backwards of ours to time too: ops.BWD values, @STRIP to set ops.STRIP")
    args = ap.parse_args()
    bench_utils.USE_GRAPH = args.graph
    peers = args.peers.split(",")
    fla_fn, fla_version = fla_attn() if "fla" in peers else (None, None)

    cases = [(8, 4096, 16, 64, 128)]
    if not args.quick:  # priority order: a --budget-s cut drops the tail
        cases += [(8, 4096, 16, 128, 128), (8, 4096, 16, 112, 128), (8, 4096, 16, 64, 64), (8, 4096, 16, 64, 256),
                  (2, 16384, 16, 64, 128), (16, 2048, 16, 64, 128), (1, 32768, 16, 64, 128), (4, 8192, 16, 64, 128),
                  (8, 4096, 16, 128, 64), (8, 4096, 16, 128, 256)]
    if args.cases:
        cases = [tuple(int(x) for x in c.split(",")) for c in args.cases.split(";")]
    meta = dict(gpu=torch.cuda.get_device_name(), torch=torch.__version__, triton=triton.__version__,
                fla=fla_version, python=platform.python_version(), date=datetime.date.today().isoformat(),
                dtype="bfloat16", timing="triton.testing.do_bench median (ms)")
    rows, t0 = [], time.time()
    for B, T, H, D, W in cases:
        if time.time() - t0 > args.budget_s:
            print(f"budget reached: skipping B={B} T={T} D={D} W={W}")
            continue
        row = run_case(B, T, H, D, W, peers, fla_fn, [b for b in args.bwd.split(",") if b])
        rows.append(row)
        print(json.dumps(row), flush=True)
        with open(args.out, "w") as f:
            json.dump(dict(meta=meta, rows=rows), f, indent=1)

    print(f"\n{meta['gpu']}, torch {meta['torch']}, triton {meta['triton']}, fla {fla_version}, bf16, median ms")
    for kind, title in bench_utils.timing_kinds():
        print(f"\n{title}, ms (fwd / fwd+bwd)")
        print("| B | T | D | W | ours | Flex | fla | fwd+bwd speedup vs Flex | vs fla |")
        print("|---|---|---|---|---|---|---|---|---|")
        for r in rows:
            cell = lambda p: f"{fmt(r.get(f'{p}_fwd{kind}_ms'))} / {fmt(r.get(f'{p}_fwdbwd{kind}_ms'))}"  # noqa: E731
            print(f"| {r['B']} | {r['T']} | {r['D']} | {r['W']} | {cell('ours')} | {cell('flex')} | {cell('fla')} | "
                  f"{fmt(r.get(f'speedup_fwdbwd{kind}_vs_flex'), 2)}x | {fmt(r.get(f'speedup_fwdbwd{kind}_vs_fla'), 2)}x |")
    for r in rows:
        print(r["D"], r["W"], r["T"], "ours kernels (fwd+bwd):", r.get("ours_kernels_fwdbwd_ms"))
        for variant in [b for b in args.bwd.split(",") if b]:
            print(f"  backward {variant}: fwd+bwd {fmt(r.get(f'ours_{variant}_fwdbwd_ms'))} ms, device "
                  f"{fmt(r.get(f'ours_{variant}_fwdbwd_device_ms'))} ms (default backward "
                  f"{fmt(r.get('ours_fwdbwd_device_ms'))}), vs Flex on device "
                  f"{fmt(r.get(f'speedup_{variant}_fwdbwd_device_vs_flex'), 2)}x; kernels "
                  f"{r.get(f'ours_{variant}_kernels_fwdbwd_ms')}")


if __name__ == "__main__":
    main()
