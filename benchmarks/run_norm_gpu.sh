#!/bin/bash
# RMSNorm on one GPU: the benchmark (torch F.rms_norm vs ours vs torch.compile, [32768, 1024 / 2048] bf16), then
# the GPU tests of tests/kernels/test_rms_norm.py (bf16 at model sizes vs fp64 and F.rms_norm).
# Expected runtime on an H100: about 55 s (wheels ~10 s; benchmark ~30 s: torch.compile of the formula and the
# Triton autotuning, 8-9 configs per kernel and width; tests ~15 s, autotuning again); each step has a timeout.
# The benchmark alone (~35 s with the wheels):
#   source benchmarks/gpu_env.sh && python benchmarks/norm.py --out $OUT/norm.json
# Usage (repo root): OUT=dir bash benchmarks/run_norm_gpu.sh
set -o pipefail
source benchmarks/gpu_env.sh || echo "FAILED: gpu_env.sh (continuing with what is installed; the checkout is importable)"
OUT=${OUT:-/tmp/norm_out}
mkdir -p "$OUT"
gpu_banner
t0=$(date +%s)
timeout ${BENCH_TIMEOUT:-50} python3 benchmarks/norm.py --out "$OUT/norm.json" $BENCH_ARGS 2>&1 \
  | tee "$OUT/norm.log" | grep -v '^{' || echo "FAILED: benchmark (see $OUT/norm.log)"
echo "== benchmark: $(( $(date +%s) - t0 )) s"
t0=$(date +%s)
timeout ${TEST_TIMEOUT:-40} python3 -m pytest -q -m gpu -p no:cacheprovider tests/kernels/test_rms_norm.py 2>&1 \
  | tee "$OUT/gpu_tests.log" | tail -15 || echo "FAILED: GPU test (see $OUT/gpu_tests.log)"
echo "== test: $(( $(date +%s) - t0 )) s"
