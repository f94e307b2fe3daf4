#!/bin/bash
# One device call for issue 5: GPU tests of the SWA and BaseConv kernels, then both benchmarks.
# Usage (repo root, on the GPU machine): bash benchmarks/run_swa_conv_gpu.sh [tests] [conv] [swa] [swa-quick]
# Carried fla wheels (.whl/) are installed into /tmp/site when present. Logs and JSON go to $OUT.
set -o pipefail
OUT=${OUT:-/tmp/swa_conv_out}
mkdir -p "$OUT" /tmp/pkgs
ln -sfn "$PWD/kernels" /tmp/pkgs/based_kernels  # import name without installing the project
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
fi
export PYTHONPATH=/tmp/pkgs:/tmp/site PYTHONUNBUFFERED=1
steps=${*:-tests conv swa}
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.mem --format=csv,noheader
for s in $steps; do
  t0=$(date +%s)
  case $s in
    tests) timeout ${TEST_TIMEOUT:-110} python3 -m pytest -q -x -m gpu -p no:cacheprovider ${TEST_K:+-k "$TEST_K"} \
             tests/kernels/test_sliding_window.py tests/kernels/test_short_conv.py 2>&1 | tee "$OUT/gpu_tests.log" \
             | tail -25 ;;
    conv) timeout ${CONV_TIMEOUT:-80} python3 benchmarks/base_conv.py --out "$OUT/base_conv.json" $CONV_ARGS 2>&1 \
            | tee "$OUT/base_conv.log" | grep -v '^{' ;;
    swa) timeout ${SWA_TIMEOUT:-150} python3 benchmarks/sliding_window.py --budget-s ${SWA_BUDGET:-100} \
           --out "$OUT/sliding_window.json" $SWA_ARGS 2>&1 | tee "$OUT/sliding_window.log" | grep -v '^{' ;;
    swa-quick) timeout 120 python3 benchmarks/sliding_window.py --quick --out "$OUT/sliding_window_quick.json" \
           2>&1 | tee "$OUT/sliding_window_quick.log" ;;
  esac
  echo "== step $s: $(( $(date +%s) - t0 )) s"
done
