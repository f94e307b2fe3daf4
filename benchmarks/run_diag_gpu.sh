#!/usr/bin/env bash
# One GPU call: whole-model checks (Triton path == PyTorch path, causality), the training-loss comparison of the
# two backends on based-360m, the SWA/BaseConv GPU tests and the BaseConv benchmark. ~6 min on an H100.
# Usage (repo root, GPU machine): OUT=dir bash benchmarks/run_diag_gpu.sh [steps...]; steps: model loss kernels conv
set -o pipefail
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
source benchmarks/gpu_env.sh || exit 1
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
q() { grep -v -i "warn\|deprecat"; }
for s in ${*:-model loss kernels conv}; do
  t0=$(date +%s)
  case $s in
    model) timeout 200 python3 -m pytest -q -rA -s -p no:cacheprovider tests/megatron_based/test_model_gpu.py 2>&1 \
             | q | tee "$OUT/model_gpu.log" | grep -E "rel err|passed|failed|Error|assert" | tail -30 ;;
    loss) for b in torch triton; do
            timeout 120 python3 benchmarks/train_throughput.py --models based-360m --seq 2048 --tokens-per-step 16384 \
              --steps 6 --warmup 3 --backend $b --out "$OUT/loss_$b.json" 2>&1 | q | tee "$OUT/loss_$b.log" \
              | grep -E "^\| based|rror" ; done ;;
    kernels) timeout 200 python3 -m pytest -q -m gpu -n 4 -p no:cacheprovider tests/kernels/test_sliding_window.py \
               tests/kernels/test_short_conv.py 2>&1 | q | tee "$OUT/kernel_tests.log" | tail -15 ;;
    conv) timeout 100 python3 benchmarks/base_conv.py --budget-s 70 --out "$OUT/base_conv.json" 2>&1 | q \
            | tee "$OUT/base_conv.log" | grep -v '^{' | tail -30 ;;
  esac
  echo "== step $s: $(( $(date +%s) - t0 )) s"
done
