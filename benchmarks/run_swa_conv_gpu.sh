#!/bin/bash
# Issue 5 in one device call: GPU tests of the SWA and BaseConv kernels, then both benchmarks.
# Expected runtime on an H100: about 4 minutes (wheels ~10 s, tests <= 90 s, BaseConv <= 60 s, SWA <= 120 s;
# every step has a timeout and the benchmarks a time budget: the goal shapes run first, later cases are cut).
# Usage (repo root, on the GPU machine): OUT=dir bash benchmarks/run_swa_conv_gpu.sh [tests] [conv] [swa] [swa-quick]
# Logs and JSON go to $OUT (default /tmp/swa_conv_out). Knobs: TEST_TIMEOUT, CONV_BUDGET, SWA_BUDGET, *_ARGS.
set -o pipefail
source benchmarks/gpu_env.sh || echo "FAILED: gpu_env.sh (continuing with what is installed; the checkout is importable)"
OUT=${OUT:-/tmp/swa_conv_out}
mkdir -p "$OUT"
steps=${*:-tests conv swa}
gpu_banner
for s in $steps; do
  t0=$(date +%s)
  case $s in
    tests) timeout ${TEST_TIMEOUT:-90} python3 -m pytest -q -m gpu -p no:cacheprovider ${TEST_K:+-k "$TEST_K"} \
             tests/kernels/test_sliding_window.py tests/kernels/test_short_conv.py 2>&1 | tee "$OUT/gpu_tests.log" \
             | tail -25 || echo "FAILED: tests (see $OUT/gpu_tests.log)" ;;
    conv) timeout 60 python3 benchmarks/base_conv.py --budget-s ${CONV_BUDGET:-35} --out "$OUT/base_conv.json" \
            $CONV_ARGS 2>&1 | tee "$OUT/base_conv.log" | grep -v '^{' || echo "FAILED: conv benchmark" ;;
    swa) timeout 120 python3 benchmarks/sliding_window.py --budget-s ${SWA_BUDGET:-75} \
           --out "$OUT/sliding_window.json" $SWA_ARGS 2>&1 | tee "$OUT/sliding_window.log" | grep -v '^{' \
           || echo "FAILED: swa benchmark" ;;
    swa-quick) timeout 90 python3 benchmarks/sliding_window.py --quick --out "$OUT/sliding_window_quick.json" \
           2>&1 | tee "$OUT/sliding_window_quick.log" | grep -v '^{' || echo "FAILED: swa-quick" ;;
    *) echo "unknown step $s (tests, conv, swa, swa-quick)" ;;
  esac
  echo "== step $s: $(( $(date +%s) - t0 )) s"
done
