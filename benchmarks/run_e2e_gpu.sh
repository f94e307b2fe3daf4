#!/usr/bin/env bash
# One GPU call: end-to-end training throughput, based-360m vs the same-size softmax GPT (issue 9).
set -o pipefail
source benchmarks/gpu_env.sh || exit 1
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
python3 -c "import torch, triton, megatron.core as m; print('torch', torch.__version__, 'triton', triton.__version__, 'megatron-core', m.__version__)"
python3 benchmarks/train_throughput.py --models based-360m gpt-360m --seq ${SEQS:-2048 8192 32768} --steps ${STEPS:-3} \
  --warmup 2 --profile --out "$OUT/train_throughput.json" 2>&1 | grep -v -i "warn\|deprecated" | tee "$OUT/train_throughput.log"
# Generation (issue 8): based-1.3b vs same-size GPT with a KV cache; bounded so the call stays short.
timeout ${GEN_TIMEOUT:-150} python3 benchmarks/generation.py --batch 128 --prompt-length 128 \
  --new-tokens ${GEN_TOKENS:-256} --json "$OUT/generation.json" 2>&1 | grep -v -i "warn\|deprecated" | tee "$OUT/generation.log"
