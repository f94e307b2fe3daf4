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
  # the compiled kernels for the next call to carry (benchmarks/gpu_env.sh): per kernel the metadata and group files
  # (.json) and the binary (.cubin), all that a cache hit reads (Triton loads the files of a kernel's group that
  # exist), and the .ptx where the archive stays within the machine's 16 MB per returned file; not the other IRs
  # (.llir, .ttir, .ttgir, .source: most of the bytes) nor the autotuning results (the runs that tune still tune)
  pack() {  # python's tarfile: xz without an xz binary on the machine; $1 = 1: with the PTX
    python3 - "$cache" "$OUT/triton_cache.tar.xz" "$1" <<'PY'
import os, sys, tarfile
root, out, ptx = sys.argv[1], sys.argv[2], sys.argv[3] == "1"
keep = (".cubin", ".json", ".ptx") if ptx else (".cubin", ".json")
with tarfile.open(out, "w:xz", preset=3) as tar:  # ~9x smaller than the files at ~10 MB/s
    for d, _, files in os.walk(root):
        for f in sorted(files):
            if f.endswith(keep) and not f.endswith(".autotune.json"):
                tar.add(os.path.join(d, f), os.path.relpath(os.path.join(d, f), root))
PY
  }
  big() { [ "$(stat -c %s "$OUT/triton_cache.tar.xz")" -gt 16000000 ]; }
  pack 1 && { ! big || pack 0; } && big \
    && { echo "triton_cache.tar.xz: $(du -h "$OUT/triton_cache.tar.xz" | cut -f1), over 16 MB: not returned"; \
         rm -f "$OUT/triton_cache.tar.xz"; }
fi
if [ -z "$SUITE_ONLY" ]; then
  # rows merge into the tracked JSON (BENCH_ARGS="--formats dp_reshardable" runs one format)
  timeout "${BENCH_TIMEOUT:-300}" python3 benchmarks/checkpoint_formats.py $BENCH_ARGS \
    --out benchmarks/results/checkpoint_formats.json 2>&1 | grep -v -i "warn" | tail -20
  cp benchmarks/results/checkpoint_formats.json "$OUT/"
fi
