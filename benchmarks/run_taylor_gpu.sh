#!/usr/bin/env bash
# One device call for issue 4: GPU tests of the Taylor kernels, then the benchmark (sweep + table).
# Run from the repository root on the GPU machine, with .whl carried (fla wheels). Logs and JSON go to $OUT.
set -o pipefail
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
source benchmarks/gpu_env.sh || exit 1
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.mem --format=csv | tee "$OUT/gpu.txt"
python3 -c 'import torch, triton, fla; print(torch.__version__, triton.__version__, fla.__version__)' | tee -a "$OUT/gpu.txt"
# tests first, in 4 processes so that kernel compiles overlap
timeout ${TEST_TIMEOUT:-150} python3 -m pytest -q -p no:cacheprovider -n 4 tests/kernels/test_taylor_attention.py 2>&1 \
  | tee "$OUT/pytest_gpu.log" | tail -25
timeout ${BENCH_TIMEOUT:-330} python3 benchmarks/taylor_attention.py ${BENCH_ARGS:---sweep} --out "$OUT/taylor_attention.json" 2>&1 \
  | tee "$OUT/bench.log"
