#!/bin/bash
# The fp32 residual stream (fp32_residual_connection, the bf16 default) on one GPU: its GPU tests, then the training
# step time of based-360m at T2048 with the residual in fp32 and in bf16, eager and with Megatron's per-layer CUDA
# graphs (benchmarks/residual_precision.py --gpu: train_throughput.py's harness, 3 warm-up + 5 timed steps each).
# A few minutes on an H100 / H200 (an estimate from the step times; the timeouts below bound it).
#   - tests/kernels/test_rms_norm.py -m gpu: fp32 in / bf16 out at model sizes (compiled kernels, round to nearest)
#   - tests/megatron_based/test_residual_precision.py -m gpu: bf16 CUDA-graph decode with the fp32 residual
#   - tests/megatron_based/test_model_gpu.py: the bf16 model tests (kernels vs torch path, fusions, Megatron CUDA
#     graphs == eager), which now run with the fp32 residual by default
# Usage (repo root): OUT=dir bash benchmarks/run_residual_gpu.sh
set -o pipefail
source benchmarks/gpu_env.sh || echo "FAILED: gpu_env.sh (continuing with what is installed; the checkout is importable)"
OUT=${OUT:-/tmp/residual_out}
mkdir -p "$OUT"
gpu_banner
t0=$(date +%s)
timeout ${TEST_TIMEOUT:-240} python3 -m pytest -q -m gpu -p no:cacheprovider tests/kernels/test_rms_norm.py \
  tests/megatron_based/test_residual_precision.py tests/megatron_based/test_model_gpu.py 2>&1 \
  | tee "$OUT/gpu_tests.log" | tail -15 || echo "FAILED: GPU tests (see $OUT/gpu_tests.log)"
echo "== tests: $(( $(date +%s) - t0 )) s"
for graphs in "" "--cuda-graphs"; do
  t0=$(date +%s)
  name=residual_precision_gpu${graphs:+_graphs}
  timeout ${BENCH_TIMEOUT:-240} python3 benchmarks/residual_precision.py --gpu $graphs --out "$OUT/$name.json" 2>&1 \
    | tee "$OUT/$name.log" | grep -v -i "warn" | tail -6 || echo "FAILED: benchmark $graphs (see $OUT/$name.log)"
  echo "== benchmark $graphs: $(( $(date +%s) - t0 )) s"
done
