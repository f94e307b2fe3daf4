#!/usr/bin/env bash
# Session-3 GPU call 2 (~8 min on an H100): GPU tests of the whole model (fusions, parity, causality), norm and
# generation; RMSNorm variants; the based-360m / gpt-360m pair at 8k with profiles (fused SwiGLU / CE / Adam now
# on for both); the GPT generation row (issue 8). Writes under $OUT.
set -o pipefail
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
source benchmarks/gpu_env.sh || exit 1
q() { grep -v -i "warn\|deprecat"; }
t0=$(date +%s)
timeout 200 python3 -m pytest -q -rA -s -m gpu -n 3 -p no:cacheprovider tests/megatron_based/test_model_gpu.py \
  tests/megatron_based/test_norm.py tests/megatron_based/test_generation.py 2>&1 | q | tee "$OUT/gpu_tests.log" \
  | grep -E "rel err|graph vs|passed|failed|FAILED|Error" | tail -25
echo "== tests: $(( $(date +%s) - t0 )) s"; t0=$(date +%s)
timeout 60 python3 benchmarks/norm.py --out "$OUT/norm.json" 2>&1 | q | tail -3
echo "== norm: $(( $(date +%s) - t0 )) s"; t0=$(date +%s)
OUT=$OUT SEQS=8192 PARTS=pairs TIMEOUT_1=170 bash benchmarks/run_e2e_gpu.sh 2>&1 | grep -E "^\||profile|FAILED|rror" | head -30
echo "== e2e: $(( $(date +%s) - t0 )) s"; t0=$(date +%s)
timeout 130 python3 benchmarks/generation.py --models gpt --batch 128 --prompt-length 128 --new-tokens 1024 \
  --json "$OUT/generation_gpt.json" 2>&1 | q | tee "$OUT/generation_gpt.log" | tail -8
echo "== generation: $(( $(date +%s) - t0 )) s"
