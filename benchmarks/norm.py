"""RMSNorm forward and forward+backward on the GPU at the models' activation shapes (32k tokens x 1024 / 2048,
bf16): PyTorch's fused F.rms_norm (the "torch" backend), the same formula through torch.compile, and ours
(based_kernels.rms_norm, Triton; what megatron_based.model.norm uses on GPUs). Per implementation: ms per call
(triton.testing.do_bench, median), the effective bandwidth of fwd+bwd (x, y, dy, dx: 8 bytes per bf16 element),
and the relative errors of y, dx and dw against an fp32 reference of the formula. Also the Triton configs the
autotuner picked and the first call's time (compile + autotune). One JSON line per shape; all rows to --out.

    python benchmarks/norm.py --out benchmarks/results/norm.json
"""
from __future__ import annotations

import argparse
import json
import time

import torch
import torch.nn.functional as F
import triton

import based_kernels
from based_kernels.rms_norm import kernels


def torch_rms(x, w, eps):
    return F.rms_norm(x, (x.shape[-1],), w.to(x.dtype), eps)


def triton_rms(x, w, eps):
    return based_kernels.rms_norm(x, w, eps, backend="triton")


def rel(a, b):
    return ((a.float() - b).norm() / b.norm()).item()


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--tokens", type=int, default=32768)
    p.add_argument("--hidden", type=int, nargs="+", default=[1024, 2048])
    p.add_argument("--impls", nargs="+", default=["torch", "triton", "compiled"])
    p.add_argument("--out", default="benchmarks/results/norm.json")
    args = p.parse_args()
    impls = dict(torch=torch_rms, compiled=torch.compile(torch_rms, dynamic=True), triton=triton_rms)
    meta = dict(device=torch.cuda.get_device_name(), torch=torch.__version__, triton=triton.__version__)
    rows = []
    for h in args.hidden:
        x = torch.randn(args.tokens, h, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        w = (torch.rand(h, device="cuda") + 0.5).to(torch.bfloat16).requires_grad_()
        dy = torch.randn_like(x)
        x32, w32 = x.detach().float().requires_grad_(), w.detach().float().requires_grad_()
        y32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + 1e-5) * w32
        ref = (y32.detach(), *torch.autograd.grad(y32, (x32, w32), dy.float()))
        del x32, w32, y32
        row = dict(tokens=args.tokens, hidden=h)
        for name in args.impls:
            fn = impls[name]
            try:
                torch.cuda.synchronize()
                t0 = time.perf_counter()
                y = fn(x, w, 1e-5)
                gx, gw = torch.autograd.grad(y, (x, w), dy)
                torch.cuda.synchronize()
                row[f"{name}_first_call_s"] = round(time.perf_counter() - t0, 2)
                for k, a, b in zip(("y", "dx", "dw"), (y, gx, gw), ref):
                    row[f"{name}_err_{k}"] = rel(a, b)
                del y, gx, gw
                fwd = triton.testing.do_bench(lambda: fn(x, w, 1e-5), return_mode="median")
                fb = triton.testing.do_bench(lambda: torch.autograd.grad(fn(x, w, 1e-5), (x, w), dy),
                                             return_mode="median")
                row[f"{name}_fwd_ms"], row[f"{name}_fwdbwd_ms"] = fwd, fb
                row[f"{name}_fwdbwd_TBps"] = 8 * x.numel() / fb / 1e9
            except Exception as e:  # noqa: BLE001 - one failing implementation must not stop the others
                row[f"{name}_error"] = f"{type(e).__name__}: {e}"[:300]
        for k, kern in (("fwd", kernels.rms_fwd_kernel), ("bwd", kernels.rms_bwd_kernel)):
            best = getattr(kern, "best_config", None)
            if best is not None and "triton" in args.impls:
                row[f"triton_{k}_config"] = f"BLOCK_M={best.kwargs['BLOCK_M']} warps={best.num_warps}"
        print(json.dumps(row), flush=True)
        rows.append(row)
        with open(args.out, "w") as fh:  # after every shape: a timeout keeps what was measured
            json.dump(dict(meta=meta, rows=rows), fh, indent=1)
    for r in rows:
        print(f"[{r['tokens']}, {r['hidden']}] bf16: " + "  ".join(
            f"{n} fwd {r.get(f'{n}_fwd_ms', float('nan')):.3f} fwd+bwd {r.get(f'{n}_fwdbwd_ms', float('nan')):.3f} ms"
            f" (err dx {r.get(f'{n}_err_dx', float('nan')):.1e})" for n in args.impls))


if __name__ == "__main__":
    main()
