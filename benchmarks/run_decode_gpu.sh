#!/usr/bin/env bash
# One GPU call for the decode speed (issue 21): every kernel of a based-1.3b decode step timed alone at its decode
# shape (benchmarks/decode_kernels.py, ~1-2 min: GEMMs under cuBLAS and cuBLASLt, the state kernels and their tile
# sweeps), then the graphed generation benchmark with its per-kernel profile (~3 min on an H100). Writes under $OUT:
# decode_kernels.json / .log, generation.json / .log. DECODE_ONLY: row groups of decode_kernels.py (e.g.
# "taylor,swa,conv,norm" when the GEMM rows are already measured on this GPU).
set -o pipefail
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
source benchmarks/gpu_env.sh || exit 1
gpu_banner
echo "== decode kernels, based-1.3b at batch 128 =="
timeout ${DECODE_TIMEOUT:-180} python3 benchmarks/decode_kernels.py ${DECODE_ONLY:+--only "$DECODE_ONLY"} \
  --json "$OUT/decode_kernels.json" 2>&1 | grep -v -i "warn\|deprecat" | tee "$OUT/decode_kernels.log" \
  || echo "FAILED: decode_kernels.py (see decode_kernels.log)"
echo "== generation benchmark, CUDA graphs only, with the step's profile =="
timeout ${GEN_TIMEOUT:-360} python3 benchmarks/generation.py --cuda-graph-only --profile 20 \
  --json "$OUT/generation.json" 2>&1 | grep -v -i "warn\|deprecat" | tee "$OUT/generation.log" \
  || echo "FAILED: generation benchmark (see generation.log)"
