#!/usr/bin/env bash
# One GPU call for issue 20, point 4 (MQAR recall as in the paper): as much of benchmarks/mqar_sweep.py's grid as
# fits in MQAR_TIME_LIMIT seconds (default 540: a 10-minute call), resumable. The grid is ~15-25 min on one H100 /
# H200 (the sweep's docstring), so two or three calls: before the next call, copy the returned mqar.json to
# benchmarks/results/mqar.json (the runs in it are skipped). Writes under $OUT: mqar.json, mqar.md (docs/mqar.md
# with the table), mqar_recall_vs_state.svg (once a run is done), mqar_sweep.log (everything) and mqar_logs.tgz
# (each run's log). MQAR_ARGS: more arguments of the sweep (e.g. "--jobs 8"). MQAR_JSON: another results file for a
# variant of the grid (e.g. MQAR_JSON=benchmarks/results/mqar_embed_dropout.json MQAR_ARGS="--embed-dropout 0.1
# --only baseconv-d64,baseconv-d128 --lrs 0.003"): its table and plot go to $OUT only, docs/ keeps the main grid's.
set -o pipefail
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
source benchmarks/gpu_env.sh || exit 1
gpu_banner
JSON=${MQAR_JSON:-benchmarks/results/mqar.json}
DOC_ARGS=()
[ "$JSON" != benchmarks/results/mqar.json ] && DOC_ARGS=(--doc "$OUT/mqar.md" --svg "$OUT/mqar_recall_vs_state.svg")
echo "== MQAR grid: $(python3 -c 'import json,sys; d=json.load(open(sys.argv[1])); print(len(d["runs"]), "runs")' \
  "$JSON" 2>/dev/null || echo "0 runs") already in $JSON =="
# the console gets every run's first epoch (its speed) and the sweep's own lines; mqar_sweep.log gets all
python3 benchmarks/mqar_sweep.py --time-limit "${MQAR_TIME_LIMIT:-540}" --log-dir /tmp/mqar_logs --json "$JSON" \
  "${DOC_ARGS[@]}" $MQAR_ARGS 2>&1 \
  | tee "$OUT/mqar_sweep.log" | grep --line-buffered -v -E "\] epoch ([2-9]|[1-9][0-9]+)/" \
  || echo "FAILED: the MQAR sweep (see mqar_sweep.log)"
# the runs' logs in one archive: the GPU machine returns at most 8 files
[ -d /tmp/mqar_logs ] && tar czf "$OUT/mqar_logs.tgz" -C /tmp mqar_logs
cp "$JSON" "$OUT/$(basename "$JSON")" 2>/dev/null || echo "no $JSON written"
if [ ${#DOC_ARGS[@]} -eq 0 ]; then
  cp docs/mqar.md "$OUT/mqar.md"
  [ -f docs/mqar_recall_vs_state.svg ] && cp docs/mqar_recall_vs_state.svg "$OUT/"
fi
exit 0
