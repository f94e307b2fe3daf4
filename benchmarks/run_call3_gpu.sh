#!/usr/bin/env bash
# Session-3 GPU call 3 (~9 min on an H100): GPU tests of the new code (packed BaseConv, cross entropy, SWA host path,
# whole model), the BaseConv backward A/B (the faster variant is then used end to end), the cross-entropy and SWA
# benchmarks, and the based-360m / gpt-360m pairs at 8k and 32k with profiles. Writes under $OUT.
set -o pipefail
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
source benchmarks/gpu_env.sh || exit 1
q() { grep -v -i "warn\|deprecat"; }
t0=$(date +%s)
timeout 170 python3 -m pytest -q -rA -m gpu -n 4 -p no:cacheprovider tests/kernels/test_short_conv.py \
  tests/kernels/test_cross_entropy.py tests/kernels/test_sliding_window.py tests/megatron_based/test_model_gpu.py \
  tests/megatron_based/test_generation.py 2>&1 | q > "$OUT/gpu_tests.log"
grep -E "^(PASSED|FAILED|ERROR)|passed|failed" "$OUT/gpu_tests.log" | grep -v PASSED | tail -20
echo "== tests: $(( $(date +%s) - t0 )) s"; t0=$(date +%s)
OUT=$OUT bash benchmarks/run_conv_bwd_gpu.sh stream tile 2>&1 | q | tail -12
BEST=$(python3 - "$OUT" <<'PY'
import json, sys
ms = {}
for v in ("stream", "tile"):
    try:
        rows = json.load(open(f"{sys.argv[1]}/base_conv_{v}.json"))
        rows = rows.get("rows", rows) if isinstance(rows, dict) else rows
        ms[v] = rows[0]["packed_fwdbwd_ms"]
    except Exception as e:  # noqa: BLE001
        print(f"{v}: {e}", file=sys.stderr)
print(min(ms, key=ms.get) if ms else "tile")
PY
)
echo "== conv A/B: $(( $(date +%s) - t0 )) s; end to end with BASED_CONV_BWD=$BEST"; t0=$(date +%s)
timeout 45 python3 benchmarks/cross_entropy.py --out "$OUT/cross_entropy.json" 2>&1 | q | tail -6
[ -s "$OUT/cross_entropy.json" ] || { echo "CE benchmark failed: e2e with Megatron's native CE"; CE="--cross-entropy native"; }
echo "== CE: $(( $(date +%s) - t0 )) s"; t0=$(date +%s)
timeout 75 python3 benchmarks/sliding_window.py --quick --peers flex --out "$OUT/sliding_window_quick.json" 2>&1 | q | grep -v '^{' | tail -12
echo "== SWA: $(( $(date +%s) - t0 )) s"; t0=$(date +%s)
E2E_ARGS="$CE" BASED_CONV_BWD=$BEST OUT=$OUT SEQS="8192 32768" PARTS=pairs TIMEOUT_1=200 bash benchmarks/run_e2e_gpu.sh 2>&1 \
  | grep -E "^\||profile|FAILED|rror" | head -30
echo "== e2e: $(( $(date +%s) - t0 )) s"
