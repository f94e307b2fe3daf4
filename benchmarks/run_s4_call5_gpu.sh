#!/usr/bin/env bash
# Session-4 GPU call 5 (~3 min on an H100): the 64k pair without CUDA graphs (the GPT needs full recompute there,
# which Megatron's per-layer graphs refuse), based-1.3b at 8k with CUDA graphs (8k tokens per step), and the
# BaseConv benchmark at the goal shape with its packed-gradient check fixed in session 3 (not re-run since).
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
timeout 40 python3 benchmarks/base_conv.py --only-ours --budget-s 5 --cases "8,4096,2048,3,megatron" \
  --out "$OUT/base_conv.json" 2>&1 | q > "$OUT/base_conv.log" || echo "FAILED: base_conv (see base_conv.log)"
tail -4 "$OUT/base_conv.log" | cut -c1-300
