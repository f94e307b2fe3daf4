#!/usr/bin/env bash
# One call on nvidia-h200-x2 (issue 9, part 2): based-360m context-parallel weak scaling (CP=2 at 2T vs CP=1 at T)
# and tensor parallelism (TP=2 + SP vs TP=1 at the same T), at T (per GPU) = 8k and 32k, one sequence per GPU and
# step, each case profiled (comm time per layer type); then benchmarks/cp_comm.py (one layer per mixer: CP op vs
# local op vs its collectives alone).
# First the multi-GPU tests (pytest -m multigpu: about 5 minutes), then the benchmark parts (about 5 minutes: setup
# 0.5, CP=1 1, CP=2 1.2, TP=2 1.2, cp_comm 1); each part has a timeout and rows are written after each case. Two
# device calls if one does not fit: TIMEOUT_0=1 skips the tests in effect.
#   bash benchmarks/run_e2e_2gpu.sh             # on the 2-GPU machine, writes under $OUT
#   bash benchmarks/run_e2e_2gpu.sh --smoke     # tiny model on CPU, 2 gloo processes (PYTHON=..., OUT optional)
set -o pipefail
if [ "$1" = "--smoke" ]; then
  PY=${PYTHON:-python3}; OUT=${OUT:-$(mktemp -d)}
  MODEL=tiny; SEQS="64"; TOK=64; STEPS="--smoke"; NOISE="^$"
  COMM_ARGS="--device cpu --t-local 64 --hidden 64 --heads 4 --feature-dim 4 --window 16 --iters 2 --warmup 1"
else
  source benchmarks/gpu_env.sh || exit 1
  PY=python3
  gpu_banner
  nvidia-smi topo -m | head -4
  MODEL=based-360m; SEQS="8192 32768"; TOK=8192; STEPS="--warmup 3 --steps 5 --profile"; NOISE="warn\|deprecated"
  COMM_ARGS="--t-local 8192 32768 --iters 10"
fi
mkdir -p "$OUT"
if [ "$1" != "--smoke" ]; then  # the multi-GPU tests first: NCCL parity and resharding (tests marked multigpu)
  echo "== multigpu tests (TP=2+SP / CP=2 / PP=2 training vs DP=2, resumed at TP=1; CP=2 NCCL bf16 parity)"
  timeout "${TIMEOUT_0:-420}" $PY -m pytest -q -ra -m multigpu tests -p no:cacheprovider \
    --junitxml="$OUT/multigpu_tests.xml" 2>&1 | grep -v -i "warn" | tail -40 | tee "$OUT/multigpu_tests.log"
fi
J="$OUT/e2e_2gpu.json"
rm -f "$J"
part() {  # name, timeout (s), processes, train_throughput.py arguments...
  local name=$1 limit=$2 n=$3; shift 3
  echo "== $name"
  timeout "$limit" $PY -m torch.distributed.run --standalone --nproc_per_node "$n" benchmarks/train_throughput.py \
    --models $MODEL --seq $SEQS --tokens-per-step $TOK $STEPS "$@" --out "$J" --append 2>&1 \
    | grep -v -i "$NOISE" | tee -a "$OUT/e2e_2gpu.log" || echo "FAILED or timed out: $name (rows so far are in $J)"
}
part "CP=1 TP=1 (one GPU)" "${TIMEOUT_1:-90}" 1
part "CP=2, sequence doubled (weak scaling)" "${TIMEOUT_2:-100}" 2 --cp 2 --weak
part "TP=2 + sequence parallel" "${TIMEOUT_3:-100}" 2 --tp 2
echo "== cp_comm (one layer per mixer)"
timeout "${TIMEOUT_4:-90}" $PY -m torch.distributed.run --standalone --nproc_per_node 2 benchmarks/cp_comm.py \
  $COMM_ARGS --out "$OUT/cp_comm.json" 2>&1 | grep -v -i "$NOISE" | tee "$OUT/cp_comm.log" || echo "FAILED: cp_comm"
$PY benchmarks/plot_throughput.py "$J" --kernels 5 --markdown "$OUT/e2e_2gpu.md" && cat "$OUT/e2e_2gpu.md" \
  || echo "FAILED: tables (run benchmarks/plot_throughput.py on the CPU side from $J)"
