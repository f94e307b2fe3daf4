"""Sliding-window attention tiles: every candidate config of the three kernels timed by the autotuner at each case
(the plain launches; the confining ones reuse the tuned config), printed fastest first per kernel. The shipped
autotune lists (forward.py, backward.py) are a subset of these candidates, chosen from this sweep's output.

    python benchmarks/swa_tiles.py [--cases "8,4096,16,64,128;8,4096,16,128,128"] [--json swa_tiles.json]

Needs a CUDA GPU (bf16; the autotuner's own timing, ``based_kernels._common.tune_bench``).
"""
from __future__ import annotations

import argparse
import datetime
import json

import triton
from triton import Config

from based_kernels.sliding_window import backward, forward


def C(bm, bn, warps, stages, maxnreg=None):
    return Config({"BM": bm, "BN": bn}, num_warps=warps, num_stages=stages, maxnreg=maxnreg)


# (BM, BN, warps, stages[, register cap]) per kernel
CANDIDATES = {
    forward.swa_fwd_kernel: [
        C(64, 64, 4, 2), C(64, 64, 4, 3), C(128, 64, 8, 2), C(128, 32, 4, 2), C(64, 32, 4, 2), C(128, 32, 8, 2),
        C(128, 128, 8, 2), C(128, 128, 8, 3), C(128, 64, 8, 3), C(128, 64, 4, 3), C(64, 64, 4, 4),
        C(64, 64, 4, 3, 168), C(64, 64, 4, 3, 128), C(64, 32, 4, 3, 128), C(128, 64, 8, 3, 128)],
    backward.swa_bwd_dq_kernel: [
        C(64, 64, 4, 2), C(64, 32, 4, 2), C(128, 64, 8, 2), C(64, 64, 8, 2), C(64, 32, 4, 3), C(64, 64, 4, 3),
        C(128, 32, 8, 2), C(128, 128, 8, 2), C(64, 32, 4, 2, 168), C(64, 32, 4, 2, 128), C(128, 64, 8, 3)],
    backward.swa_bwd_dkdv_kernel: [
        C(64, 64, 4, 2), C(32, 64, 4, 2), C(64, 128, 8, 2), C(64, 32, 8, 2), C(32, 32, 4, 2), C(64, 64, 4, 3),
        C(32, 64, 4, 3), C(128, 64, 8, 2), C(32, 128, 8, 2), C(64, 128, 8, 3), C(64, 64, 4, 2, 168),
        C(32, 64, 4, 2, 168), C(32, 64, 4, 2, 128), C(64, 64, 8, 2), C(32, 32, 4, 3)],
}


def key(cfg: Config) -> tuple:
    return cfg.kwargs["BM"], cfg.kwargs["BN"], cfg.num_warps, cfg.num_stages, cfg.maxnreg


def main():
    import torch

    from based_kernels import sliding_window_attention
    from based_kernels._common import forget_launches

    ap = argparse.ArgumentParser()
    ap.add_argument("--cases", default="8,4096,16,64,128;8,4096,16,128,128", help="B,T,H,D,W;...")
    ap.add_argument("--json", default=None, help="also write the timings here")
    args = ap.parse_args()
    for tuner, cands in CANDIDATES.items():
        tuner.configs = cands
    out = dict(gpu=torch.cuda.get_device_name(), torch=torch.__version__, triton=triton.__version__,
               date=datetime.date.today().isoformat(), cases=[])
    for case in args.cases.split(";"):
        B, T, H, D, W = (int(x) for x in case.split(","))
        for tuner in CANDIDATES:
            tuner.cache.clear()
        forget_launches()
        q, k, v = (torch.randn(B, T, H, D, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
        o = sliding_window_attention(q, k, v, window=W)
        o.backward(torch.randn_like(o))
        torch.cuda.synchronize()
        print(f"== B {B} T {T} H {H} D {D} W {W}: ms per launch (BM, BN, warps, stages, register cap)")
        row = dict(B=B, T=T, H=H, D=D, W=W, kernels={})
        for tuner in CANDIDATES:
            name = tuner.fn.__name__
            timed = [(key(c), ms[0] if isinstance(ms, list) else ms) for c, ms in tuner.configs_timings.items()]
            timed.sort(key=lambda kv: kv[1])
            row["kernels"][name] = [dict(config=list(c), ms=ms) for c, ms in timed]
            for c, ms in timed:
                print(f"  {name:20s} {str(c):28s} {ms:.4f}", flush=True)
        out["cases"].append(row)
        del q, k, v, o
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
