"""Compile the sliding-window kernels (forward, dQ and dK/dV backward, the fused backward; each plain and
confining) for sm_90a on a machine without a GPU (Triton's bundled ptxas) and report registers, spills and shared
memory for every configuration of their autotune lists: catches compile errors and spills before a GPU run.

    python benchmarks/aot_check_swa.py [--d 64 128] [--window 128]
"""
from __future__ import annotations

import argparse

import triton
from triton.compiler import ASTSource
from triton.backends.compiler import GPUTarget
from triton.runtime.jit import JITFunction

from aot_check_conv import ptxas_report  # this folder is on the path when run as a script
from based_kernels.sliding_window import backward, backward_fused, forward

KERNELS = {"fwd": forward.swa_fwd_kernel, "dq": backward.swa_bwd_dq_kernel, "dkdv": backward.swa_bwd_dkdv_kernel,
           "fused": backward_fused.swa_bwd_fused_kernel}


def signature(fn: JITFunction, consts: dict) -> dict:
    sig = {}
    for name in fn.arg_names:
        if name in consts:
            sig[name] = "constexpr"
        elif name in ("lse", "delta", "acc"):
            sig[name] = "*fp32"
        elif name in ("doc", "bad"):
            sig[name] = "*i32"
        elif name == "scale":
            sig[name] = "fp32"
        elif name.startswith("s_") or name in ("T", "P", "H", "LT"):
            sig[name] = "i32"
        else:
            sig[name] = "*bf16"
    return sig


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--d", type=int, nargs="+", default=[64, 128], help="head dims")
    ap.add_argument("--window", type=int, default=128)
    args = ap.parse_args()
    for D in args.d:
        for name, tuner in KERNELS.items():
            fn = tuner
            while not isinstance(fn, JITFunction):  # the autotuner (and launch wrappers) around the kernel
                fn = fn.fn
            for cfg, confine in [(cfg, c) for cfg in tuner.configs.all for c in (False, True)]:
                bm, bn = cfg.kwargs.get("BM", cfg.kwargs.get("BB")), cfg.kwargs.get("BN", cfg.kwargs.get("BB"))
                consts = dict(D=D, W=args.window, G=1, BLOCK_D=max(16, triton.next_power_of_2(D)), **cfg.kwargs,
                              HAS_PREFIX=False, IS_VARLEN=False, DOT_PREC="tf32", CONFINE=confine)
                label = (f"d {D:3d} {name:4s} {'confining' if confine else 'plain':9s} BM {bm:3d} BN {bn:3d} "
                         f"warps {cfg.num_warps} stages {cfg.num_stages} regs cap {cfg.maxnreg}")
                try:
                    k = triton.compile(ASTSource(fn=fn, signature=signature(fn, consts), constexprs=consts),
                                       target=GPUTarget("cuda", 90, 32),
                                       options={"num_warps": cfg.num_warps, "num_stages": cfg.num_stages,
                                                **({"maxnreg": cfg.maxnreg} if cfg.maxnreg else {})})
                    regs, spill = ptxas_report(k.asm["ptx"])
                    print(f"{label}: regs {regs}, spill {spill} B, smem {k.metadata.shared} B", flush=True)
                except Exception as e:  # noqa: BLE001
                    print(f"{label}: FAILED {repr(e)[:400]}", flush=True)


if __name__ == "__main__":
    main()
