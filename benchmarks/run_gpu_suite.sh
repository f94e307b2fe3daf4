#!/usr/bin/env bash
# The GPU suite on the GPU machine, as a user runs it: `make test-gpu` (kernels, model, and the entry points:
# megatron-based-train kill/resume eager and CUDA-graphed, generate, eval, `make demo`), then the optimizer
# checkpoint-format benchmark at based-1.3b. From the repository root with .whl carried (megatron-core wheel):
#   bash benchmarks/run_gpu_suite.sh            # logs (logs.tgz), JUnit XML and JSON under $OUT
#   SUITE_ONLY=1 / BENCH_ONLY=1                  # one half
#   GPU_TESTS="tests/megatron_based tests/kernels"  # the suite in another order (make test-gpu's GPU_TESTS)
set -o pipefail
source benchmarks/gpu_env.sh || exit 1
OUT=${OUT:-$(mktemp -d)}
gpu_banner
if [ -z "$BENCH_ONLY" ]; then
  start=$(date +%s)
  # every autotuning a process runs (not read from Triton's disk cache) prints its kernel, key and time (the logs)
  export TRITON_PRINT_AUTOTUNING=${TRITON_PRINT_AUTOTUNING:-1}
  # SIGINT at the limit (default 555 s: with the set-up above and the logs below, a 10-minute GPU call): pytest
  # stops and still prints its summary and durations and writes the JUnit XML
  timeout -s INT "${SUITE_TIMEOUT:-555}" make test-gpu GPU_TESTS="${GPU_TESTS:-tests}" \
    PYTEST_ARGS="--durations=80 -s --junitxml=$OUT/gpu_suite.xml $PYTEST_EXTRA" \
    2>&1 | tee "$OUT/gpu_suite.log" | grep -v -i "warn" | tail -120
  echo "make test-gpu: exit ${PIPESTATUS[0]} after $(( $(date +%s) - start )) s"
  # the training / generation logs the entry-point tests wrote (pytest's newest temporary directory, without its
  # "current" links), in one archive (the GPU machine returns at most 8 files)
  latest=$(readlink -f /tmp/pytest-of-"$(id -un)"/pytest-current 2>/dev/null)
  [ -n "$latest" ] && (cd "$latest" && find . -name "*.log" -size -2M -not -path "*current*" \
    | tar czf "$OUT/logs.tgz" -T -)
  cache=${TRITON_CACHE_DIR:-$HOME/.triton/cache}
  echo "Triton cache: $(find "$cache" -type f 2>/dev/null | wc -l) files," \
    "$(find "$cache" -name "*.autotune.json" 2>/dev/null | wc -l) autotuning results"
  # the compiled kernels for the next call to carry (benchmarks/gpu_env.sh unpacks them): benchmarks/triton_cache.py
  # says which files; over the machine's 16 MB per returned file, in parts (triton_cache.tar.xz.0, .1, ...)
  # (bounded: a pack cut off by the call's limit returns nothing, the suite's logs above still come back)
  timeout "${PACK_TIMEOUT:-90}" python3 benchmarks/triton_cache.py pack "$cache" "$OUT/triton_cache.tar.xz" \
    || { echo "packing the Triton cache failed or took over ${PACK_TIMEOUT:-90} s"; rm -f "$OUT"/triton_cache.tar.xz*; }
fi
if [ -z "$SUITE_ONLY" ]; then
  # rows merge into the tracked JSON (BENCH_ARGS="--formats dp_reshardable" runs one format)
  timeout "${BENCH_TIMEOUT:-300}" python3 benchmarks/checkpoint_formats.py $BENCH_ARGS \
    --out benchmarks/results/checkpoint_formats.json 2>&1 | grep -v -i "warn" | tail -20
  cp benchmarks/results/checkpoint_formats.json "$OUT/"
fi
