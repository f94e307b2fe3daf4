"""One Taylor-kernel launch configuration, checked in its own process (an illegal memory access poisons the CUDA
context, so each candidate of ``taylor_attention.py --sweep`` is checked here first): forward and backward at B 2,
T 2048 (H 16, f 16, d_v 64, bf16) against the fp64 chunked reference, then at the sweep's shape (B 8, T 4096).

    python benchmarks/taylor_config_check.py --chunk 64 --grad 64 64 8 1 [--output 64 64 8 2] [--query-rows 32]
        [--split] [--output-split [BF W S] | --one-output-kernel] [--late-partials] [--grad-state-split [BF W S]]
        [--no-keep] [--hi-intra 0]
        [--time [16,2048,64 ...]] [--kernels]

Prints one line: the configuration, then OK with the relative errors, or FAILED with the error."""
from __future__ import annotations

import argparse
import sys

import torch

from based_kernels.taylor_attention import ops, taylor_linear_attention
from bench_utils import kernel_breakdown  # this folder is on the path when run as a script
from taylor_attention import errors_vs_fp64, inputs, ours, time_case


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--chunk", type=int, default=ops.CHUNK)
    ap.add_argument("--grad", type=int, nargs=4, default=list(ops.CONFIG["grad"]), metavar=("BF", "BV", "W", "S"))
    ap.add_argument("--output", type=int, nargs=4, default=list(ops.CONFIG["output"]),
                    metavar=("BF", "BV", "W", "S"))
    ap.add_argument("--query-rows", type=int, default=ops.OUTPUT_QUERY_ROWS,
                    help="ops.OUTPUT_QUERY_ROWS: the output pass's query rows per program (0: the whole chunk)")
    ap.add_argument("--split", action="store_true", help="ops.GRAD_SPLIT")
    ap.add_argument("--output-split", type=int, nargs="*", metavar="BF W S",
                    help="ops.OUTPUT_SPLIT on (the default), with CONFIG['state_part']'s feature block, warps and "
                         "stages if given")
    ap.add_argument("--one-output-kernel", action="store_true", help="ops.OUTPUT_SPLIT off")
    ap.add_argument("--late-partials", action="store_true", help="ops.OUTPUT_PARTIAL_LATE")
    ap.add_argument("--grad-state-split", type=int, nargs="*", metavar="BF W S",
                    help="ops.GRAD_STATE_SPLIT on, with CONFIG['grad_state']'s feature block, warps and stages if "
                         "given")
    ap.add_argument("--no-keep", action="store_true", help="ops.KEEP_STATES off")
    ap.add_argument("--hi-intra", type=int, choices=(0, 1), default=int(ops.HI_INTRA),
                    help="ops.HI_INTRA: the forward's intra-chunk A @ v on fp32 (tf32) operands (1) or bf16 (0)")
    ap.add_argument("--time", nargs="*", metavar="B,T,DV",
                    help="also time forward + backward and forward (median ms) at B 8, T 4096 and these shapes")
    ap.add_argument("--kernels", action="store_true",
                    help="also print each kernel's device ms per forward + backward at B 8, T 4096 (torch.profiler)")
    a = ap.parse_args()
    ops.CHUNK, ops.CONFIG["grad"], ops.GRAD_SPLIT, ops.KEEP_STATES = a.chunk, tuple(a.grad), a.split, not a.no_keep
    ops.HI_INTRA = bool(a.hi_intra)
    ops.CONFIG["output"], ops.OUTPUT_QUERY_ROWS = tuple(a.output), a.query_rows or None
    ops.OUTPUT_SPLIT = (ops.OUTPUT_SPLIT or a.output_split is not None) and not a.one_output_kernel
    ops.GRAD_STATE_SPLIT = a.grad_state_split is not None
    ops.OUTPUT_PARTIAL_LATE = a.late_partials
    if a.grad_state_split:
        if len(a.grad_state_split) != 3:
            ap.error("--grad-state-split takes no value or three: BF W S")
        bf, w, st = a.grad_state_split
        ops.CONFIG["grad_state"] = (bf, ops.CONFIG["grad_state"][1], w, st)
    if a.output_split:
        if len(a.output_split) != 3:
            ap.error("--output-split takes no value or three: BF W S")
        bf, w, st = a.output_split
        ops.CONFIG["state_part"] = (bf, ops.CONFIG["state_part"][1], w, st)
    # the warps given, also where the library caps them (ops.grad_warps: below chunk 128), to re-check that crash
    ops.GRAD_WARPS_SMALL_CHUNK = max(ops.GRAD_WARPS_SMALL_CHUNK, a.grad[2])
    # split at the value block given, also where the library runs it unsplit (ops.grad_split), to re-check it
    ops.GRAD_SPLIT_MIN_BV = min(ops.GRAD_SPLIT_MIN_BV, a.grad[1])
    label = (f"chunk {a.chunk} output {tuple(a.output)} rows {ops.OUTPUT_QUERY_ROWS} grad {tuple(a.grad)} split"
             f" {a.split} keep {not a.no_keep} hi_intra {ops.HI_INTRA}"
             + (f" output_split {ops.CONFIG['state_part']}" if ops.OUTPUT_SPLIT else "")
             + (f" grad_state_split {ops.CONFIG['grad_state']}" if ops.GRAD_STATE_SPLIT else "")
             + (" late_partials" if ops.OUTPUT_PARTIAL_LATE else ""))
    try:
        errs = [errors_vs_fp64(2, 2048, 64)[0][key] for key in ("y", "dq", "dk", "dv")]
        q, k, v = inputs(8, 4096, 64, seed=2, grad=True)
        y, _ = taylor_linear_attention(q, k, v)
        y.backward(torch.randn_like(y))
        torch.cuda.synchronize()
        finite = all(torch.isfinite(t).all().item() for t in (y, q.grad, k.grad, v.grad))
    except Exception as e:  # noqa: BLE001
        print(f"{label}: FAILED {type(e).__name__}: {str(e).splitlines()[0][:160]}", flush=True)
        return 1
    ok = finite and max(errs) < 1e-2
    shapes = [(8, 4096, 64)] + [tuple(int(x) for x in s.split(",")) for s in a.time or []]
    timed = "".join(f"; B{B} T{T} d_v {dv} fwd+bwd {time_case(ours, B, T, dv, 'fwdbwd'):.3f} ms, fwd "
                    f"{time_case(ours, B, T, dv, 'fwd'):.3f} ms" for B, T, dv in shapes if ok and a.time is not None)
    print(f"{label}: {'OK' if ok else 'WRONG'} y/dq/dk/dv rel. err vs fp64 "
          f"{' '.join(f'{e:.2e}' for e in errs)}; B8 T4096 finite {finite}{timed}", flush=True)
    if ok and a.kernels:
        dy = torch.randn_like(y)
        total, top = kernel_breakdown(lambda: taylor_linear_attention(q, k, v)[0].backward(dy), top=12)
        print(f"  kernels per fwd+bwd (device ms, total {total}): "
              + ", ".join(f"{name} {t}" for name, t in top.items()), flush=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
