#!/bin/bash
# Cross entropy on one GPU: the benchmark (ours vs Megatron's fused native vs torch fp32, [32768, 50264] bf16),
# then the GPU test of tests/kernels/test_cross_entropy.py.
# Expected runtime on an H100: about 50 s (wheels ~10 s, benchmark ~25 s of which Megatron's torch.compile is
# most, test ~15 s); each step has a timeout. Usage (repo root): OUT=dir bash benchmarks/run_cross_entropy_gpu.sh
set -o pipefail
source benchmarks/gpu_env.sh || echo "FAILED: gpu_env.sh (continuing with what is installed; the checkout is importable)"
OUT=${OUT:-/tmp/cross_entropy_out}
mkdir -p "$OUT"
gpu_banner
t0=$(date +%s)
timeout ${BENCH_TIMEOUT:-45} python3 benchmarks/cross_entropy.py --out "$OUT/cross_entropy.json" $BENCH_ARGS 2>&1 \
  | tee "$OUT/cross_entropy.log" | grep -v '^{' || echo "FAILED: benchmark (see $OUT/cross_entropy.log)"
echo "== benchmark: $(( $(date +%s) - t0 )) s"
t0=$(date +%s)
timeout ${TEST_TIMEOUT:-40} python3 -m pytest -q -m gpu -p no:cacheprovider tests/kernels/test_cross_entropy.py 2>&1 \
  | tee "$OUT/gpu_tests.log" | tail -15 || echo "FAILED: GPU test (see $OUT/gpu_tests.log)"
echo "== test: $(( $(date +%s) - t0 )) s"
