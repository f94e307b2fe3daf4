#!/usr/bin/env bash
# Session-3 GPU call 4 (~7.5 min on an H100): serial reruns of the GPU tests that ran out of memory under xdist in
# call 3 (+ the recorded-replay one), the BaseConv backward A/B at the goal shape, the GPT-with-KV-cache generation
# row (issue 8), and end to end: the 2k pair and based-360m at 32k (LR 1e-4). Writes under $OUT.
set -o pipefail
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
source benchmarks/gpu_env.sh || exit 1
q() { grep -v -i "warn\|deprecat"; }
t0=$(date +%s)
timeout 120 python3 -m pytest -q -rA -m gpu -p no:cacheprovider tests/megatron_based/test_model_gpu.py \
  tests/kernels/test_sliding_window.py tests/megatron_based/test_generation.py \
  -k "equals_torch_path or fusions or recorded or 112 or 4-128-False-64" 2>&1 | q > "$OUT/gpu_tests.log"
grep -E "^(PASSED|FAILED|ERROR) |passed|failed|^E  " "$OUT/gpu_tests.log" | cut -c1-200 | tail -20
echo "== tests: $(( $(date +%s) - t0 )) s"; t0=$(date +%s)
for v in stream tile; do
  timeout 35 python3 benchmarks/base_conv.py --only-ours --bwd-variant $v --budget-s 5 --cases "8,4096,2048,3,megatron" \
    --out "$OUT/base_conv_$v.json" 2>&1 | q > "$OUT/base_conv_$v.log" || echo "FAILED: conv $v"
done
BEST=$(python3 - "$OUT" <<'PY'
import json, sys
ms = {}
for v in ("stream", "tile"):
    try:
        r = json.load(open(f"{sys.argv[1]}/base_conv_{v}.json"))["rows"][0]
        ms[v] = r["packed_fwdbwd_ms"]
        print(v, {k: r.get(k) for k in ("packed_fwd_ms", "packed_fwdbwd_ms", "packed_fwdbwd_device_ms",
                                      "packed_kernels_fwdbwd_ms")}, file=sys.stderr)
    except Exception as e:  # noqa: BLE001
        print(f"{v}: {e}", file=sys.stderr)
print(min(ms, key=ms.get) if ms else "tile")
PY
)
echo "== conv A/B: $(( $(date +%s) - t0 )) s; BASED_CONV_BWD=$BEST"; t0=$(date +%s)
timeout 140 python3 benchmarks/generation.py --models gpt --batch 128 --prompt-length 128 \
  --new-tokens 1024 --json "$OUT/generation_gpt.json" 2>&1 | q | tee "$OUT/generation_gpt.log" | grep -v "^\s*$" | tail -12
echo "== generation: $(( $(date +%s) - t0 )) s"; t0=$(date +%s)
J="$OUT/train_throughput.json"
BASED_CONV_BWD=$BEST timeout 75 python3 benchmarks/train_throughput.py --models based-360m gpt-360m --seq 2048 \
  --tokens-per-step 32768 --out "$J" --append 2>&1 | q | grep -E "^\||rror" | tail -4
BASED_CONV_BWD=$BEST timeout 50 python3 benchmarks/train_throughput.py --models based-360m --seq 32768 \
  --tokens-per-step 32768 --out "$J" --append 2>&1 | q | grep -E "^\||rror" | tail -3
echo "== e2e: $(( $(date +%s) - t0 )) s"
