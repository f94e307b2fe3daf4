#!/usr/bin/env bash
# Session-4 GPU call 3 (~9.5 min on an H100): end to end with Megatron-Core's CUDA-graphed layers for both models
# (the 8k pair profiled), at 8k, 32k and 2k; then the GPU tests of this session's code, serially, each test's
# name printed as it ends (call 2's run timed out at 170 s before printing). Writes under $OUT.
set -o pipefail
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
source benchmarks/gpu_env.sh || exit 1
q() { grep -v -i "warn\|deprecat"; }
t0=$(date +%s)
J="$OUT/train_throughput.json"
e2e() {  # timeout (s), train_throughput.py arguments
  local limit=$1; shift
  timeout "$limit" python3 benchmarks/train_throughput.py --tokens-per-step 32768 --cuda-graphs --out "$J" --append \
    "$@" 2>&1 | q >> "$OUT/train_throughput.log" || echo "FAILED or timed out: e2e $*"
  echo "== e2e $*: $(( $(date +%s) - t0 )) s"; t0=$(date +%s)
}
e2e 110 --models based-360m gpt-360m --seq 8192 --profile
e2e 90 --models based-360m gpt-360m --seq 32768
e2e 80 --models based-360m gpt-360m --seq 2048
grep -E "^\| [bg]|rror|profile |idle" "$OUT/train_throughput.log" | cut -c1-400
python3 benchmarks/plot_throughput.py "$J" --markdown "$OUT/train_throughput.md" --png "$OUT/train_throughput.png" \
  > /dev/null || echo "FAILED: plot"
timeout 260 python3 -m pytest -v -rA -m gpu -p no:cacheprovider --durations=15 \
  tests/megatron_based/test_model_gpu.py tests/kernels/test_rms_norm.py tests/kernels/test_rope.py \
  tests/megatron_based/test_rope_fusion.py 2>&1 | q > "$OUT/gpu_tests.log"
grep -E "PASSED|FAILED|ERROR|passed|failed|s call" "$OUT/gpu_tests.log" | cut -c1-160 | tail -40
echo "== tests: $(( $(date +%s) - t0 )) s"
