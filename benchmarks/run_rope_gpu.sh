#!/bin/bash
# Fused RoPE + q/k/v split on one GPU: the benchmark (fused vs Megatron's split + apply_rotary_pos_emb, [8192, 4,
# 16, 3 * 64] bf16, and a GQA shape), then tests/kernels/test_rope.py on the GPU (the gpu-marked bf16 test at the
# model's size and every CPU test on CUDA tensors with compiled kernels: odd shapes, d_h 24, strided grads) and the
# model-level fused == Megatron-path test.
# Expected runtime on an H100: about 80 s (wheels ~10 s, benchmark ~25 s, kernel tests ~30 s mostly Triton
# compiles, model test ~15 s); each step has a timeout. Usage (repo root): OUT=dir bash benchmarks/run_rope_gpu.sh
set -o pipefail
source benchmarks/gpu_env.sh || echo "FAILED: gpu_env.sh (continuing with what is installed; the checkout is importable)"
OUT=${OUT:-/tmp/rope_out}
mkdir -p "$OUT"
gpu_banner
t0=$(date +%s)
timeout ${BENCH_TIMEOUT:-60} python3 benchmarks/rope.py --out "$OUT/rope.json" 2>&1 \
  | tee "$OUT/rope.log" | grep -v '^{' || echo "FAILED: benchmark (see $OUT/rope.log)"
echo "== benchmark: $(( $(date +%s) - t0 )) s"
t0=$(date +%s)
timeout ${TEST_TIMEOUT:-90} python3 -m pytest -q -p no:cacheprovider tests/kernels/test_rope.py 2>&1 \
  | tee "$OUT/gpu_tests.log" | tail -15 || echo "FAILED: kernel tests (see $OUT/gpu_tests.log)"
echo "== kernel tests: $(( $(date +%s) - t0 )) s"
t0=$(date +%s)
timeout ${MODEL_TIMEOUT:-60} python3 -m pytest -q -m gpu -p no:cacheprovider \
  tests/megatron_based/test_rope_fusion.py 2>&1 | tee "$OUT/model_tests.log" | tail -5 \
  || echo "FAILED: model test (see $OUT/model_tests.log)"
echo "== model test: $(( $(date +%s) - t0 )) s"
