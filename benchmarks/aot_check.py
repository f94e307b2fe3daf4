"""Compile the Taylor chunk kernels and the decode kernel for sm_90a on a machine without a GPU (Triton's bundled
ptxas) and report registers, spills and shared memory per configuration: catches compile errors and spills before a
GPU run.

    python benchmarks/aot_check.py [--dtype bf16] [--dv 64] [--passes output] [--query-rows 0 32 64]
"""
from __future__ import annotations

import argparse

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from based_kernels.taylor_attention import chunk, ops, recurrent
# this folder is on the path when run as a script: ptxas's report, the sweep's configurations
from aot_check_conv import ptxas_report
from taylor_attention import CANDIDATES

PTR = {"bf16": "*bf16", "fp16": "*fp16", "fp32": "*fp32"}


def compile_kernel(fn, dtype, consts, nw, ns):
    p, f32p, s_dt = PTR[dtype], "*fp32", PTR["bf16" if dtype == "bf16" else "fp32"]
    typed = {"den": f32p, "dd": f32p, "col": f32p, "h0s": f32p, "h0z": f32p, "zc": f32p, "hts": f32p,
             "htz": f32p, "dzc": f32p, "hl": f32p, "hc": s_dt, "dhc": s_dt, "cu_seqlens": "*i32",
             "chunk_offsets": "*i32", "chunk_meta": "*i32", "scale": "fp32", "eps": "fp32", "s_in": f32p, "z_in": f32p,
             "s_out": f32p, "z_out": f32p, "s": f32p, "z": f32p, "kb": p, "vb": p, "cnt": "*i32", "sq": "*bf16",
             "bad": "*i32", "feat": "*i32", "nump": f32p, "denp": f32p, "pdq": f32p, "pdk": f32p, "pdv": f32p}
    sig = {}
    for n in fn.arg_names:
        if n in consts:
            sig[n] = "constexpr"
        elif n in typed:
            sig[n] = typed[n]
        elif n in ("q", "k", "v", "o", "x", "w", "dy", "dv", "y"):
            sig[n] = p
        elif n in ("dq", "dk"):
            sig[n] = p
        else:
            sig[n] = "i32"
    k = triton.compile(ASTSource(fn=fn, signature=sig, constexprs=consts), target=GPUTarget("cuda", 90, 32),
                       options={"num_warps": nw, "num_stages": ns})
    return (*ptxas_report(k.asm["ptx"]), k.metadata.shared)


def report(label, fn, dtype, consts, nw, ns):
    """One line: ``label``, then the compiled kernel's registers, spills and shared memory, or why it failed."""
    try:
        regs, spill, smem = compile_kernel(fn, dtype, consts, nw, ns)
        print(f"{label}: regs {regs}, spill {spill} B, smem {smem} B", flush=True)
    except Exception as e:  # noqa: BLE001
        print(f"{label}: FAILED {repr(e)[:400]}")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--dtype", default="bf16")
    ap.add_argument("--dv", type=int, default=64)
    ap.add_argument("--f", type=int, default=16)
    ap.add_argument("--passes", nargs="+", default=["state", "output", "grad", "decode"],
                    choices=["state", "output", "grad", "decode"])
    ap.add_argument("--query-rows", type=int, nargs="+", default=[0],
                    help="the output pass's query rows per program (ops.OUTPUT_QUERY_ROWS; 0: the whole chunk)")
    args = ap.parse_args()
    F, DV = args.f, args.dv
    BK = max(16, triton.next_power_of_2(F))
    D = 1 + F + F * (F + 1) // 2
    for BT in (64, 128):
        for name, cfgs in CANDIDATES.items():
            if name not in args.passes:
                continue
            # the gradient pass as one kernel (part 0) or split (ops.GRAD_SPLIT: parts 1 and 2)
            # the output pass per query-row block (0: the whole chunk)
            rows = [r for r in args.query_rows if r < BT] if name == "output" else [0]
            for BF, BV, nw, ns, part, BQ in [(*c, p, r) for c in cfgs for r in rows
                                              for p in ((0, 1, 2) if name == "grad" else (0,))]:
                BV = min(BV, DV)
                # the fp32-operand products' precision, as based_kernels._common.dot_precision picks it under
                # torch's default
                prec = "ieee" if args.dtype == "fp32" else "tf32"
                base = dict(F=F, DV=DV, BK=BK, BT=BT, BF=BF, BV=BV, PREC=prec)
                if name == "state":
                    fn, c = chunk.taylor_chunk_state_kernel, dict(base, REVERSE=False, USE_H0=False,
                                                                  STORE_HT=False, IS_VARLEN=False, STORE_LOW=True,
                                                                  GROUPS=1, TOTALS=False)
                elif name == "output":
                    # the plain launch (ops launches it, then the confining one: _common.launch_confined)
                    fn, c = chunk.taylor_chunk_output_kernel, dict(base, NF=triton.cdiv(D, BF), IS_VARLEN=False,
                                                                   HI_INTRA=ops.HI_INTRA, BL=ops.low_rows_tile(F),
                                                                   LOW_PREC="ieee" if prec == "ieee" else "tf32x3",
                                                                   CONFINE=False, BQ=BQ, PARTIAL=ops.OUTPUT_SPLIT,
                                                                   PARTIAL_LATE=ops.OUTPUT_PARTIAL_LATE)
                else:
                    fn, c = chunk.taylor_chunk_grad_kernel, dict(base, NF=triton.cdiv(D, BF), IS_VARLEN=False,
                                                                 HI=ops.HI_BWD, PART=part, STATE_IN=False)
                label = f"{name}{part}" if part else (f"{name} rows {BQ}" if BQ else name)
                report(f"BT {BT:3d} {label:6s} BF {BF:3d} BV {BV:3d} warps {nw} stages {ns}", fn, args.dtype, c, nw,
                       ns)
        if "grad" in args.passes:  # the gradient pass split by its terms (ops.GRAD_STATE_SPLIT) at its tiles
            BF, BV, nw, ns = ops.CONFIG["grad"]
            BV = min(BV, DV)
            prec = "ieee" if args.dtype == "fp32" else "tf32"
            c = dict(F=F, DV=DV, BK=BK, BT=BT, BF=BF, BV=BV, NF=triton.cdiv(D, BF), IS_VARLEN=False, HI=ops.HI_BWD,
                     PREC=prec, PART=0, STATE_IN=True)
            report(f"BT {BT:3d} grad, intra-chunk terms BV {BV:3d} warps {nw} stages {ns}",
                   chunk.taylor_chunk_grad_kernel, args.dtype, c, nw, ns)
            for BF, _, nw, ns in {ops.CONFIG["grad_state"], (32, 0, 8, 1), (64, 0, 4, 1), (32, 0, 4, 2), (16, 0, 4, 1)}:
                c = dict(F=F, DV=DV, BK=BK, BT=BT, BF=BF, BV=BV, NF=triton.cdiv(D, BF), IS_VARLEN=False, PREC=prec)
                report(f"BT {BT:3d} grad, state terms BF {BF:3d} BV {BV:3d} warps {nw} stages {ns}",
                       chunk.taylor_chunk_grad_state_kernel, args.dtype, c, nw, ns)
        if "output" in args.passes and ops.OUTPUT_SPLIT:  # the output pass's state part at its tiles
            BF, BV, nw, ns = ops.CONFIG["state_part"]
            BV = min(BV, DV)
            prec = "ieee" if args.dtype == "fp32" else "tf32"
            c = dict(F=F, DV=DV, BK=BK, BT=BT, BF=BF, BV=BV, NF=triton.cdiv(D, BF), IS_VARLEN=False,
                     BL=ops.low_rows_tile(F), PREC=prec, LOW_PREC="ieee" if prec == "ieee" else "tf32x3")
            report(f"BT {BT:3d} state part BF {BF:3d} BV {BV:3d} warps {nw} stages {ns}",
                   chunk.taylor_chunk_state_part_kernel, args.dtype, c, nw, ns)
    # the decode kernel as ops launches it (8 warps): out of place (one value block per program, with and without
    # a state) and in place (every value block in one program)
    BV, BV_IN = min(64, max(16, triton.next_power_of_2(DV))), min(32, max(16, triton.next_power_of_2(DV)))
    decode = ((True, BV, 1, 8), (False, BV, 1, 8), (True, BV_IN, triton.cdiv(DV, BV_IN), 8))
    for has, bv, nvb, nw in decode if "decode" in args.passes else ():
        c = dict(F=F, DV=DV, BK=BK, BP=triton.next_power_of_2(F * (F + 1) // 2), BV=bv, NVB=nvb, HAS_STATE=has)
        report(f"decode BV {bv:3d} NVB {nvb} warps {nw} state {has}", recurrent.taylor_step_kernel, args.dtype, c, nw,
               1)
    # the buffered in-place decode kernel (ops.STEP_BUFFER tokens kept unexpanded) at its tiles (ops.STEP_BUFFERED),
    # its feature rows as two tiles as ops launches it (and with the bf16 copy of the quadratic rows)
    for C, copy in [(C, copy) for C in (ops.STEP_BUFFER, 8, 32) for copy in (False, True)] \
            if "decode" in args.passes else ():
        c, nw = ops.step_buffered_consts(F, DV, C)
        c["HAS_COPY"] = copy
        label = f"decode buffered C {C:2d}{' read copy' if copy else ''} BV {c['BV']:3d} warps {nw}"
        report(label, recurrent.taylor_step_buffered_kernel, args.dtype, c, nw, 1)


if __name__ == "__main__":
    main()
