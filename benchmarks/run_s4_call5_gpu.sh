#!/usr/bin/env bash
# Session-4 GPU call 5 (~3 min on an H100): the 64k pair without CUDA graphs (the GPT needs full recompute there,
# which Megatron's per-layer graphs refuse), and based-1.3b at 8k with CUDA graphs (8k tokens per step).
set -o pipefail
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
source benchmarks/gpu_env.sh || exit 1
q() { grep -v -i "warn\|deprecat"; }
t0=$(date +%s)
J="$OUT/train_throughput.json"
e2e() {  # timeout (s), train_throughput.py arguments
  local limit=$1; shift
  timeout "$limit" python3 benchmarks/train_throughput.py --out "$J" --append "$@" 2>&1 | q >> "$OUT/train_throughput.log" \
    || echo "FAILED or timed out: e2e $*"
  echo "== e2e $*: $(( $(date +%s) - t0 )) s"; t0=$(date +%s)
}
e2e 100 --models based-360m gpt-360m --seq 65536 --tokens-per-step 65536 --warmup 2 --steps 3 --recompute-on-oom
e2e 60 --cuda-graphs --models based-1.3b --seq 8192 --tokens-per-step 8192 --warmup 2 --steps 3
grep -E "^\| [bg]|rror" "$OUT/train_throughput.log" | cut -c1-400
