#!/usr/bin/env bash
# compute-sanitizer memcheck on the Taylor output pass at the shape where it read shared memory out of bounds on an
# H100 at 8 warps (f 8, d_v 32, bf16, packed documents of 3, 12 and 9 tokens, 4 heads, the final state; Taylor
# README): the library's launch (ops.OUTPUT_NARROW_WARPS at value blocks of 32 columns or fewer), then the output
# pass forced to 8 warps as configured before, alone and with one setting changed each (HI_INTRA off, no final state,
# 32-row feature blocks), to re-check the read (e.g. on a newer Triton). One line per run: the settings, memcheck's
# error summary and the first error with its place. From the repository root with .whl carried; the log also goes to
# $OUT.
#   bash benchmarks/memcheck_taylor.sh
set -o pipefail
source benchmarks/gpu_env.sh || exit 1
OUT=${OUT:-$(mktemp -d)}
log="$OUT/memcheck_taylor.log"
gpu_banner | tee "$log"
script='
import sys, torch
from based_kernels.taylor_attention import ops, taylor_linear_attention
warps, hi, final, bf = sys.argv[1], sys.argv[2] == "1", sys.argv[3] == "1", int(sys.argv[4])
if warps != "library":
    ops.OUTPUT_NARROW_WARPS = int(warps)
ops.HI_INTRA = hi
ops.CONFIG["output"] = (bf, *ops.CONFIG["output"][1:])
g = torch.Generator(device="cuda").manual_seed(0)
q, k = (torch.randn(1, 24, 4, 8, device="cuda", generator=g, dtype=torch.bfloat16) for _ in range(2))
v = torch.randn(1, 24, 4, 32, device="cuda", generator=g, dtype=torch.bfloat16)
cu = torch.tensor([0, 3, 15, 24], device="cuda", dtype=torch.int32)
y, _ = taylor_linear_attention(q, k, v, cu_seqlens=cu, output_final_state=final)
torch.cuda.synchronize()
print("finite", torch.isfinite(y).all().item())
'
# warps (library: as the library launches it), HI_INTRA, final state, feature rows per block
for run in "library 1 1 64" "8 1 1 64" "8 0 1 64" "8 1 0 64" "8 1 1 32"; do
  out=$(timeout "${RUN_TIMEOUT:-60}" compute-sanitizer --tool memcheck --print-limit 3 \
    python3 -W ignore -c "$script" $run 2>&1)
  echo "warps, hi_intra, final state, BF: $run: $(grep -m1 -o 'ERROR SUMMARY.*' <<< "$out" || echo 'no summary');" \
    "$(grep -m1 -E '^========= (Invalid|Uninitialized|Program hit|Error)' <<< "$out" | cut -c11-)" \
    "$(grep -m1 '^=========     at' <<< "$out" | cut -c15-) $(grep -m1 '^finite' <<< "$out")" | tee -a "$log"
done
