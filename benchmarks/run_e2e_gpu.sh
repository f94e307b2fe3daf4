#!/usr/bin/env bash
# One GPU call: end-to-end training throughput and per-layer-type profile (issue 9), based-360m vs the same-size
# softmax GPT at T = 2k, 8k, 32k and 64k, and based-1.3b at 8k and 32k.
# Expected runtime on one H100: about 6 minutes (setup 0.5, 360m pairs at 2k/8k/32k 3, 64k 1.5, based-1.3b 1);
# env SEQS (pair lengths) and PARTS (pairs 64k 1.3b) pick a subset, E2E_ARGS adds train_throughput.py arguments; every part has its own timeout (TIMEOUT_1/2/3, seconds) and rows are written after each case, so a slow part
# loses only its own tail. Env: GEN=1 also runs the bounded generation benchmark (issue 8, +2.5 min).
#   bash benchmarks/run_e2e_gpu.sh              # on the GPU machine, writes under $OUT
#   bash benchmarks/run_e2e_gpu.sh --smoke      # tiny models on CPU, a few steps (PYTHON=..., OUT optional)
set -o pipefail
if [ "$1" = "--smoke" ]; then
  PY=${PYTHON:-python3}; OUT=${OUT:-$(mktemp -d)}
  M360="tiny gpt-tiny"; SEQS="64"; T64=128; M13="tiny"; S13="64"; TOK=128; TOK13=64
  STEPS="--smoke"; STEPS64="--smoke --recompute"; NOISE="^$"
else
  source benchmarks/gpu_env.sh || exit 1
  PY=python3
  gpu_banner
  M360="based-360m gpt-360m"; SEQS=${SEQS:-8192 32768 2048}; T64=65536; M13="based-1.3b"; S13="8192 32768"
  TOK=32768; TOK13=8192; STEPS="--warmup 3 --steps 5 --profile"; STEPS64="--warmup 2 --steps 3 --profile --profile-steps 1"
  NOISE="warn\|deprecated"
fi
mkdir -p "$OUT"
$PY -c "import sys, torch, triton, megatron.core as m; print('python', sys.version.split()[0], \
'torch', torch.__version__, 'triton', triton.__version__, 'megatron-core', m.__version__)"
J="$OUT/train_throughput.json"
rm -f "$J"
part() {  # name, timeout (s), train_throughput.py arguments...
  local name=$1 limit=$2; shift 2
  echo "== $name"
  timeout "$limit" $PY benchmarks/train_throughput.py "$@" $E2E_ARGS --out "$J" --append 2>&1 | grep -v -i "$NOISE" \
    | tee -a "$OUT/train_throughput.log" || echo "FAILED or timed out: $name (rows so far are in $J)"
}
PARTS=${PARTS:-pairs 64k 1.3b}
# 1. The pairs at 8k, 32k, 2k (sequence-major), 32k tokens per step; 2 profiled steps per case.
[[ $PARTS == *pairs* ]] && part "360m pairs" "${TIMEOUT_1:-180}" --models $M360 --seq $SEQS --tokens-per-step $TOK $STEPS
# 2. 64k, one sequence per step: without recompute where it fits, else retried with full recompute (the row says).
[[ $PARTS == *64k* ]] && part "64k" "${TIMEOUT_2:-100}" --models $M360 --seq $T64 --tokens-per-step $T64 --recompute-on-oom $STEPS64
# 3. based-1.3b, 8k tokens per step (its optimizer state and 32k tokens of activations exceed 80 GB).
[[ $PARTS == *1.3b* ]] && part "based-1.3b" "${TIMEOUT_3:-100}" --models $M13 --seq $S13 --tokens-per-step $TOK13 --recompute-on-oom $STEPS64
# Tables (markdown) and the PNG, from the JSON (pillow; if it is missing here, run it on the CPU side).
$PY benchmarks/plot_throughput.py "$J" --png "$OUT/train_throughput.png" --markdown "$OUT/train_throughput.md" \
  && cat "$OUT/train_throughput.md" || echo "FAILED: plot_throughput (run it on the CPU side from $J)"
if [ "${GEN:-0}" = 1 ] && [ "$1" != "--smoke" ]; then  # issue 8: based-1.3b vs same-size GPT with a KV cache
  timeout "${GEN_TIMEOUT:-150}" $PY benchmarks/generation.py --batch 128 --prompt-length 128 \
    --new-tokens "${GEN_TOKENS:-256}" --json "$OUT/generation.json" 2>&1 | grep -v -i "$NOISE" \
    | tee "$OUT/generation.log" || echo "FAILED: generation"
fi
