#!/usr/bin/env bash
# Sliding-window attention against FlexAttention at the speed goals' four shapes (docs/benchmarks.md), once with the
# kernels of another tree and once with this checkout's, one process each on the same GPU: what a kernel change costs
# or gains. BASE: a folder holding the other tree's based_kernels package, made here before the GPU call, e.g.
#   mkdir -p runs/base && git archive main based_kernels | tar -x -C runs/base
#   BASE=runs/base OUT=dir bash benchmarks/run_swa_compare_gpu.sh   # (carry runs); base.json and this.json in $OUT
set -o pipefail
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
[ -d "${BASE:-}/based_kernels" ] || { echo "BASE=$BASE holds no based_kernels folder"; exit 2; }
source benchmarks/gpu_env.sh || exit 1
CASES="8,4096,16,64,128;8,4096,16,128,128;2,16384,16,64,128;8,4096,16,64,64"
for which in base this; do
  path=$PYTHONPATH
  [ $which = base ] && path=/tmp/site:$(readlink -f "$BASE"):$PWD
  echo "== $which: $(PYTHONPATH=$path python3 -P -c 'import based_kernels; print(based_kernels.__file__)')"
  PYTHONPATH=$path timeout "${SWA_TIMEOUT:-170}" python3 benchmarks/sliding_window.py --peers flex \
    --out "$OUT/$which.json" --cases "$CASES" 2>&1 | grep -v -i warn | tail -14
done
