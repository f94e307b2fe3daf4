"""RMSNorm forward+backward on the GPU: PyTorch's fused rms_norm (what megatron_based.norm uses) vs the same formula
through torch.compile, at
based-360m's activation shape (32k tokens x 1024, bf16). Prints ms per call (device time, median) and writes JSON.

    python benchmarks/norm.py --out benchmarks/results/norm.json
"""
from __future__ import annotations

import argparse
import json
import os
import sys

import torch
import triton

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from megatron_based.norm import rms_norm  # noqa: E402


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--tokens", type=int, default=32768)
    p.add_argument("--hidden", type=int, nargs="+", default=[1024, 2048])
    p.add_argument("--out", default="benchmarks/results/norm.json")
    args = p.parse_args()
    compiled = torch.compile(rms_norm, dynamic=True)
    rows = []
    for h in args.hidden:
        x = torch.randn(args.tokens, h, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        w = torch.randn(h, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        dy = torch.randn_like(x)
        row = dict(tokens=args.tokens, hidden=h)
        ref = None
        for name, fn in (("torch", rms_norm), ("compiled", compiled)):
            y = fn(x, w, 1e-5)
            gx, gw = torch.autograd.grad(y, (x, w), dy)
            if ref is None:
                ref = (y.float(), gx.float(), gw.float())
            row[f"{name}_err"] = max(((a.float() - b).norm() / b.norm()).item() for a, b in zip((y, gx, gw), ref))
            row[f"{name}_fwd_ms"] = triton.testing.do_bench(lambda: fn(x, w, 1e-5), return_mode="median")
            row[f"{name}_fwdbwd_ms"] = triton.testing.do_bench(
                lambda: torch.autograd.grad(fn(x, w, 1e-5), (x, w), dy), return_mode="median")
        print(json.dumps(row), flush=True)
        rows.append(row)
    meta = dict(device=torch.cuda.get_device_name(), torch=torch.__version__, triton=triton.__version__)
    with open(args.out, "w") as fh:
        json.dump(dict(meta=meta, rows=rows), fh, indent=1)


if __name__ == "__main__":
    main()
