#!/bin/bash
# BaseConv packed op + backward-kernel A/B (tile vs stream) in one device call.
# Expected runtime on an H100: about 85 s (wheels ~10 s, GPU tests <= 40 s, each benchmark variant <= 20 s; every
# step has a timeout and the benchmarks a time budget, so the goal shape always runs first).
# Usage (repo root, on the GPU machine): OUT=dir bash benchmarks/run_conv_bwd_gpu.sh [tests] [stream] [tile]
# Logs and JSON go to $OUT (default /tmp/conv_bwd_out). Knobs: TEST_TIMEOUT, CONV_BUDGET, CONV_CASES.
set -o pipefail
source benchmarks/gpu_env.sh || echo "FAILED: gpu_env.sh (continuing with what is installed; the checkout is importable)"
OUT=${OUT:-/tmp/conv_bwd_out}
mkdir -p "$OUT"
steps=${*:-tests stream tile}
CASES=${CONV_CASES:-"8,4096,2048,3,megatron;8,4096,1024,3,contiguous;8,4096,2048,3,contiguous;1,32768,2048,3,megatron"}
gpu_banner
for s in $steps; do
  t0=$(date +%s)
  case $s in
    tests) timeout ${TEST_TIMEOUT:-40} python3 -m pytest -q -m gpu -p no:cacheprovider tests/kernels/test_short_conv.py \
             2>&1 | tee "$OUT/conv_gpu_tests.log" | tail -15 || echo "FAILED: tests (see $OUT/conv_gpu_tests.log)" ;;
    stream|tile) timeout 20 python3 benchmarks/base_conv.py --only-ours --bwd-variant $s --budget-s ${CONV_BUDGET:-10} \
             --cases "$CASES" --out "$OUT/base_conv_$s.json" 2>&1 | tee "$OUT/base_conv_$s.log" | grep -v '^{' || echo "FAILED: $s benchmark" ;;
    *) echo "unknown step $s (tests, stream, tile)" ;;
  esac
  echo "== step $s: $(( $(date +%s) - t0 )) s"
done
