"""Compile the BaseConv kernels (forward, tile and stream backward, initial-state backward, decode step) for
sm_90a on a machine without a GPU (Triton's bundled ptxas) and report registers, spills and shared memory per
autotune configuration: catches compile errors and spills before a GPU run.

    python benchmarks/aot_check_conv.py [--dtype bf16] [--k 3]
"""
from __future__ import annotations

import argparse
import re
import subprocess
import tempfile

import triton

from based_kernels.short_conv import backward, forward, recurrent

PTR = {"bf16": "*bf16", "fp16": "*fp16", "fp32": "*fp32"}
POINTERS = {"doc": "*i32", "cu": "*i32", "dwp": "*fp32", "dbp": "*fp32", "w": "*fp32"}


def ptxas_report(ptx):
    """(registers, spill-store bytes) from Triton's bundled ptxas for sm_90a."""
    with tempfile.NamedTemporaryFile("w", suffix=".ptx") as fh:
        fh.write(ptx)
        fh.flush()
        ptxas = triton.backends.nvidia.compiler.get_ptxas(90).path
        out = subprocess.run([ptxas, "-arch=sm_90a", "-v", fh.name, "-o", "/dev/null"], capture_output=True,
                             text=True).stderr
    regs = re.search(r"Used (\d+) registers", out)
    spill = re.search(r"(\d+) bytes spill stores", out)
    return int(regs.group(1)) if regs else None, int(spill.group(1)) if spill else None


def compile_conv(fn, dtype, consts, nw, ns):
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    # as the JIT specializes real shapes: 16-byte aligned pointers, strides and sizes divisible by 16, weight
    # [C, K] contiguous (s_wk == 1 becomes a constant, s_wc = K is not divisible)
    consts = dict(consts, **({"s_wk": 1} if "s_wk" in fn.arg_names else {}))
    sig, attrs = {}, {}
    for i, n in enumerate(fn.arg_names):
        if n not in consts and n != "s_wc":
            attrs[(i,)] = [["tt.divisibility", 16]]
        if n in consts:
            sig[n] = "constexpr"
        elif n in POINTERS:
            sig[n] = POINTERS[n]
        elif n.startswith("s_") or n in ("T", "C", "NT"):
            sig[n] = "i32"
        else:
            sig[n] = PTR[dtype]
    k = triton.compile(ASTSource(fn=fn, signature=sig, constexprs=consts, attrs=attrs), target=GPUTarget("cuda", 90, 32),
                       options={"num_warps": nw, "num_stages": ns})
    regs, spill = ptxas_report(k.asm["ptx"])
    return regs, spill, k.metadata.shared


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--dtype", default="bf16")
    ap.add_argument("--k", type=int, default=3)
    args = ap.parse_args()
    K = args.k
    for flags in (dict(HAS_INIT=False, HAS_BIAS=True, IS_VARLEN=False), dict(HAS_INIT=True, HAS_BIAS=True,
                                                                               IS_VARLEN=True)):
        tag = "varlen+init" if flags["IS_VARLEN"] else "bias"
        kernels = [("fwd", forward.conv_fwd_kernel, {}), ("bwd tile", backward.conv_bwd_kernel,
                                                          {"CHUNK": backward.CHUNK}),
                   ("bwd stream", backward.conv_bwd_stream_kernel, {"CHUNK": backward.CHUNK})]
        for name, kern, extra in kernels:
            for cfg in kern.configs:
                consts = dict(K=K, GATE=True, **flags, **extra, **cfg.kwargs)
                label = f"{tag:11s} {name:10s} {cfg.kwargs} warps {cfg.num_warps} stages {cfg.num_stages}"
                try:
                    regs, spill, smem = compile_conv(kern.fn, args.dtype, consts, cfg.num_warps, cfg.num_stages)
                    print(f"{label}: regs {regs}, spill {spill} B, smem {smem} B", flush=True)
                except Exception as e:  # noqa: BLE001
                    print(f"{label}: FAILED {repr(e)[:400]}", flush=True)
    for name, fn, consts in [("bwd init", backward.conv_bwd_init_kernel, dict(K=K, GATE=True, HAS_BIAS=True,
                                                                               IS_VARLEN=True, BC=128)),
                             ("step", recurrent.conv_step_kernel, dict(K=K, GATE=True, HAS_STATE=True,
                                                                      HAS_BIAS=True, INPLACE=False, BC=256)),
                             ("step inplace", recurrent.conv_step_kernel, dict(K=K, GATE=True, HAS_STATE=True,
                                                                              HAS_BIAS=True, INPLACE=True, BC=256))]:
        try:
            regs, spill, smem = compile_conv(fn, args.dtype, consts, 4, 3)
            print(f"{name}: regs {regs}, spill {spill} B, smem {smem} B")
        except Exception as e:  # noqa: BLE001
            print(f"{name}: FAILED {repr(e)[:400]}")


if __name__ == "__main__":
    main()
