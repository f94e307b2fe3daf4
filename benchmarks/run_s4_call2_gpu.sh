#!/usr/bin/env bash
# Session-4 GPU call 2 (~8 min on an H100): the GPU tests of the Triton RMSNorm, the fused RoPE and the
# CUDA-graphed layers plus the whole-model parity tests (serial: xdist on one GPU ran out of memory); the norm and
# RoPE benchmarks; end to end at T = 8k: eager with profile, CUDA-graphed layers (megatron_based.cuda_graphs) with
# profile, and Megatron-Core's own cuda_graph_impl="local" (BASED only). Writes under $OUT.
set -o pipefail
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
source benchmarks/gpu_env.sh || exit 1
q() { grep -v -i "warn\|deprecat"; }
t0=$(date +%s)
timeout 170 python3 -m pytest -q -rA -m gpu -p no:cacheprovider tests/kernels/test_rms_norm.py \
  tests/kernels/test_rope.py tests/megatron_based/test_rope_fusion.py tests/megatron_based/test_model_gpu.py 2>&1 | q > "$OUT/gpu_tests.log"
grep -E "^(PASSED|FAILED|ERROR) |passed|failed" "$OUT/gpu_tests.log" | cut -c1-160 | tail -30
echo "== tests: $(( $(date +%s) - t0 )) s"; t0=$(date +%s)
timeout 45 python3 benchmarks/norm.py --out "$OUT/norm.json" 2>&1 | q | tail -3 || echo "FAILED: norm benchmark"
timeout 40 python3 benchmarks/rope.py --out "$OUT/rope.json" 2>&1 | q | tail -3 || echo "FAILED: rope benchmark"
echo "== kernel benchmarks: $(( $(date +%s) - t0 )) s"; t0=$(date +%s)
e2e() {  # tag, timeout (s), train_throughput.py arguments
  local tag=$1 limit=$2; shift 2
  timeout "$limit" python3 benchmarks/train_throughput.py --tokens-per-step 32768 --out "$OUT/tt_$tag.json" "$@" 2>&1 \
    | q > "$OUT/tt_$tag.log" || echo "FAILED or timed out: e2e $tag"
  grep -E "^\| [bg]|rror|profile |idle" "$OUT/tt_$tag.log" | cut -c1-400 | tail -8
  echo "== e2e $tag: $(( $(date +%s) - t0 )) s"; t0=$(date +%s)
}
e2e eager 100 --models based-360m gpt-360m --seq 8192 --profile
e2e graphs 110 --models based-360m gpt-360m --seq 8192 --cuda-graphs torch --profile
e2e mcore 70 --models based-360m --seq 8192 --cuda-graphs megatron
