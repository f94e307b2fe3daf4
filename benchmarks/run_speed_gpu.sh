#!/usr/bin/env bash
# One GPU call for issue 21's kernel and decode table, each against its peer in the same process: Taylor linear
# attention vs fla (parallel_based, fused_chunk_based) and FlashAttention-2 (B*T = 32k, T 2k-8k and 32k, d_v 64, 128);
# sliding-window attention vs FlexAttention at the shapes (goal, d 128, T 16k, W 64); decode of based-1.3b vs
# GPT-1.3b, both with CUDA-graphed decode (batch 128, prompt 128). From the repository root with .whl carried
# (`make wheels`: megatron-core, fla-core, einops). Writes under $OUT: taylor_attention.json, sliding_window.json,
# generation.json and speed.log. Each part has its own time limit (*_TIMEOUT, seconds), so one slow part cannot
# take the others' time.
set -o pipefail
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
source benchmarks/gpu_env.sh || exit 1
{
  gpu_banner
  python3 -c 'import fla; print("fla", fla.__version__)' || echo "fla missing: its columns stay empty"
  echo "== Taylor linear attention (ours vs fla vs FA2) =="
  timeout "${TAYLOR_TIMEOUT:-200}" python3 benchmarks/taylor_attention.py --quick \
    --out "$OUT/taylor_attention.json" || echo "FAILED or cut: the Taylor benchmark"
  echo "== sliding-window attention (ours vs FlexAttention) =="
  timeout "${SWA_TIMEOUT:-120}" python3 benchmarks/sliding_window.py --peers flex --out "$OUT/sliding_window.json" \
    --cases "8,4096,16,64,128;8,4096,16,128,128;2,16384,16,64,128;8,4096,16,64,64" \
    || echo "FAILED or cut: the SWA benchmark"
  echo "== decode: based-1.3b vs GPT-1.3b, CUDA-graphed decode for both =="
  timeout "${GEN_TIMEOUT:-200}" python3 benchmarks/generation.py --batch 128 --prompt-length 128 --new-tokens 1024 \
    --cuda-graph-only --profile 20 --json "$OUT/generation.json" || echo "FAILED or cut: the generation benchmark"
} 2>&1 | grep --line-buffered -v -i "warn" | tee "$OUT/speed.log"
