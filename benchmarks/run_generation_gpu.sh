#!/usr/bin/env bash
# One GPU call for issue 8 (generation). Expected runtime on one H100: ~6 min (GPU tests ~1 min incl. Triton
# compilation, benchmark ~4 min: based-1.3b guard + eager + CUDA graph, GPT-1.3b guard + eager + CUDA graphs (one
# per KV-length bucket); 1024 new tokens at batch 128). Needs one GPU. Writes under $OUT: pytest_gpu.log,
# generation.json, generation.log.
set -o pipefail
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
source benchmarks/gpu_env.sh || exit 1
gpu_banner

echo "== GPU tests: CUDA-graph decode == eager (in-process, fp32) =="
timeout 240 python3 -m pytest -m gpu tests/megatron_based/test_generation.py -q -rA -s -p no:cacheprovider 2>&1 \
  | grep -v -i "warn\|deprecat" | tee "$OUT/pytest_gpu.log" | grep -E "graph vs|passed|failed|Error|error|assert" \
  || echo "FAILED: GPU tests (see pytest_gpu.log)"

echo "== generation benchmark: based-1.3b vs GPT-1.3b, bf16, batch 128, prompt 128, 1024 new tokens =="
timeout ${GEN_TIMEOUT:-420} python3 benchmarks/generation.py --batch 128 --prompt-length 128 --new-tokens 1024 \
  --json "$OUT/generation.json" 2>&1 | grep -v -i "warn\|deprecat" | tee "$OUT/generation.log" \
  || echo "FAILED: generation benchmark (see generation.log; partial rows are printed as they finish)"
