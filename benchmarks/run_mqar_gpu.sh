#!/usr/bin/env bash
# One GPU call for issue 20, point 4 (MQAR recall as in the paper): as much of benchmarks/mqar_sweep.py's grid as
# fits in MQAR_TIME_LIMIT seconds (default 540: a 10-minute call), resumable. The grid is ~15-25 min on one H100 /
# H200 (the sweep's docstring), so two or three calls: before the next call, copy the returned mqar.json to
# benchmarks/results/mqar.json (the runs in it are skipped). Writes under $OUT: mqar.json, mqar.md (docs/mqar.md
# with the table), mqar_recall_vs_state.svg (once a run is done), mqar_logs.tgz (mqar_sweep.log: everything, and
# each run's log). MQAR_ARGS: more arguments of the sweep (e.g. "--jobs 8"). MQAR_JSON: another results file for a
# variant of the grid (e.g. MQAR_JSON=benchmarks/results/mqar_embed_dropout.json MQAR_ARGS="--embed-dropout 0.1
# --only baseconv-d64,baseconv-d128 --lrs 0.003"): its table and plot go to $OUT only, docs/ keeps the main grid's.
#
# Runs longer than a call (BaseConv's 64 epochs: 8-20 minutes) continue across calls: each run keeps its training
# state (megatron-based-mqar train --state, after every epoch) until it is done, and the states of the runs the time
# limit cut come back as mqar_state.tar.aa, .ab, ... (at most 4 parts of 14 MiB: the GPU machine returns 8 files of
# 16 MiB, and the carried tree is 64 MiB with the wheels; the largest states beyond 55 MiB are left out, and those
# runs start again). Before the next call: `mkdir -p .mqar-state && rm -f .mqar-state/* && cp
# /work/.device/N/mqar_state.tar.* .mqar-state/` and carry .mqar-state (git-ignored) beside .whl.
set -o pipefail
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
source benchmarks/gpu_env.sh || exit 1
gpu_banner
JSON=${MQAR_JSON:-benchmarks/results/mqar.json}
DOC_ARGS=()
[ "$JSON" != benchmarks/results/mqar.json ] && DOC_ARGS=(--doc "$OUT/mqar.md" --svg "$OUT/mqar_recall_vs_state.svg")
echo "== MQAR grid: $(python3 -c 'import json,sys; d=json.load(open(sys.argv[1])); print(len(d["runs"]), "runs")' \
  "$JSON" 2>/dev/null || echo "0 runs") already in $JSON =="
STATE=/tmp/mqar_state
mkdir -p "$STATE"
if ls .mqar-state/mqar_state.tar.* >/dev/null 2>&1; then
  cat .mqar-state/mqar_state.tar.* | tar x -C /tmp || echo "FAILED: unpacking .mqar-state (the runs start afresh)"
  echo "== training states carried: $(ls "$STATE" | tr '\n' ' ')"
fi
# the console gets every run's first epoch (its speed) and the sweep's own lines; mqar_sweep.log gets all
mkdir -p /tmp/mqar_logs
python3 benchmarks/mqar_sweep.py --time-limit "${MQAR_TIME_LIMIT:-540}" --log-dir /tmp/mqar_logs --json "$JSON" \
  --state-dir "$STATE" "${DOC_ARGS[@]}" $MQAR_ARGS 2>&1 \
  | tee /tmp/mqar_logs/mqar_sweep.log | grep --line-buffered -v -E "\] epoch ([2-9]|[1-9][0-9]+)/" \
  || echo "FAILED: the MQAR sweep (see mqar_sweep.log)"
# the sweep's and the runs' logs in one archive: the GPU machine returns at most 8 files
tar czf "$OUT/mqar_logs.tgz" -C /tmp mqar_logs
# the cut runs' states, largest left out first while they exceed 55 MiB, in parts of 14 MiB
while [ "$(du -sb "$STATE" | cut -f1)" -gt $((55 * 1024 * 1024)) ]; do
  big=$(ls -S "$STATE" | head -1); echo "left out (too large to come back; it starts again): $big"; rm "$STATE/$big"
done
if [ -n "$(ls "$STATE")" ]; then
  tar cf - -C /tmp mqar_state | split -b 14m - "$OUT/mqar_state.tar."
  echo "== training states of the cut runs: $(ls "$STATE" | tr '\n' ' ')-> $(ls "$OUT" | grep -c mqar_state.tar) part(s)"
fi
cp "$JSON" "$OUT/$(basename "$JSON")" 2>/dev/null || echo "no $JSON written"
if [ ${#DOC_ARGS[@]} -eq 0 ]; then
  cp docs/mqar.md "$OUT/mqar.md"
  [ -f docs/mqar_recall_vs_state.svg ] && cp docs/mqar_recall_vs_state.svg "$OUT/"
fi
exit 0
