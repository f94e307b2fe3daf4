#!/usr/bin/env bash
# compute-sanitizer on the Taylor output pass at the shape where memcheck saw an out-of-bounds shared-memory read on
# an H100 (f 8, d_v 32, bf16, packed documents of 3, 12 and 9 tokens, 4 heads, the final state; Taylor README): under
# memcheck and initcheck, with the constant / linear rows' tile (BL) at 16 (the old tile) and as the library picks it
# (ops.low_rows_tile), the output pass at 2 and 1 pipeline stages. One line per run: the settings, memcheck's error
# summary and the first error with its place. From the repository root with .whl carried; the log also goes to $OUT.
#   bash benchmarks/memcheck_taylor.sh
set -o pipefail
source benchmarks/gpu_env.sh || exit 1
OUT=${OUT:-$(mktemp -d)}
log="$OUT/memcheck_taylor.log"
gpu_banner | tee "$log"
script='
import sys, torch
from based_kernels.taylor_attention import ops, taylor_linear_attention
bl, stages = sys.argv[1], int(sys.argv[2])
if bl != "library":
    ops.low_rows_tile = lambda F: int(bl)
ops.CONFIG["output"] = (*ops.CONFIG["output"][:3], stages)
g = torch.Generator(device="cuda").manual_seed(0)
q, k = (torch.randn(1, 24, 4, 8, device="cuda", generator=g, dtype=torch.bfloat16) for _ in range(2))
v = torch.randn(1, 24, 4, 32, device="cuda", generator=g, dtype=torch.bfloat16)
cu = torch.tensor([0, 3, 15, 24], device="cuda", dtype=torch.int32)
y, _ = taylor_linear_attention(q, k, v, cu_seqlens=cu, output_final_state=True)
torch.cuda.synchronize()
print("finite", torch.isfinite(y).all().item())
'
for tool in memcheck initcheck; do
  for bl in 16 library; do
    for stages in 2 1; do
      out=$(timeout "${RUN_TIMEOUT:-120}" compute-sanitizer --tool "$tool" --print-limit 3 \
        python3 -W ignore -c "$script" "$bl" "$stages" 2>&1)
      echo "$tool BL $bl stages $stages: $(grep -m1 -o 'ERROR SUMMARY.*' <<< "$out" || echo 'no summary');" \
        "$(grep -m1 -E '^========= (Invalid|Uninitialized|Program hit|Error)' <<< "$out" | cut -c11-)" \
        "$(grep -m1 '^=========     at' <<< "$out" | cut -c15-) $(grep -m1 '^finite' <<< "$out")" | tee -a "$log"
    done
  done
done
