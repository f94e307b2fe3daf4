#!/usr/bin/env bash
# The fused SWA backward (ops.BWD = "fused") on the GPU machine: its GPU tests (bf16 at real sizes against fp64,
# bitwise across strip lengths, NaN confinement), then our fwd+bwd with each backward beside FlexAttention at the
# speed goals' four shapes, one process (benchmarks/sliding_window.py --bwd). From the repository root, .whl carried:
#   OUT=dir bash benchmarks/run_swa_fused_gpu.sh     # swa_fused.json in $OUT
#   TEST_TIMEOUT=120 BENCH_TIMEOUT=240 BWDS=fused,fused@512 CASES="B,T,H,D,W;..."
set -o pipefail
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
source benchmarks/gpu_env.sh >/dev/null || exit 1
gpu_banner
start=$(date +%s)
BASED_KERNELS_AUTOTUNE=0 timeout "${TEST_TIMEOUT:-120}" python3 -m pytest -q -ra -m gpu -s -k fused \
  tests/kernels/test_sliding_window.py --durations=10 2>&1 | grep -v -i warn | tail -25
echo "fused backward GPU tests: exit ${PIPESTATUS[0]} after $(( $(date +%s) - start )) s"
CASES=${CASES:-"8,4096,16,64,128;8,4096,16,128,128;2,16384,16,64,128;8,4096,16,64,64"}
timeout "${BENCH_TIMEOUT:-240}" python3 benchmarks/sliding_window.py --peers flex --bwd "${BWDS:-fused,fused@512}" \
  --cases "$CASES" --out "$OUT/swa_fused.json" 2>&1 | grep -v -i warn | grep -v '^{' | tail -30
