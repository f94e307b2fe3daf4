#!/usr/bin/env bash
# Megatron-LM's own pretrain_gpt.py training BASED through --spec (docs/training.md, "Training with Megatron-LM's
# pretrain_gpt.py") on one GPU: the documented flags at based-360m's size, mock data, bf16, the distributed
# optimizer; 20 iterations with a save at 10 and 20, then a resume from iteration 20 (--load) to 30. Checks: the
# loss falls, the resumed run starts at iteration 20 and its loss at 25-30 continues the first run's trend.
#   bash benchmarks/run_megatron_lm_gpu.sh            # on the GPU machine (writes under $OUT)
# MEGATRON_LM: a directory with Megatron-LM's pretrain_gpt.py, gpt_builders.py and model_provider.py at tag
# core_v0.19.0 (the megatron package itself is the installed megatron-core 0.19 wheel, which ships
# megatron.training); default .megatron-lm, made here by `make megatron-lm` (a shallow clone of that tag) and
# carried to the GPU machine like .whl.
set -o pipefail
source benchmarks/gpu_env.sh || exit 1
gpu_banner
MLM=${MEGATRON_LM:-.megatron-lm}
for f in pretrain_gpt.py gpt_builders.py model_provider.py; do
  [ -f "$MLM/$f" ] || { echo "$MLM/$f is missing: make megatron-lm (or set MEGATRON_LM)"; exit 2; }
done
OUT=${OUT:-$(mktemp -d)}
# Megatron-LM's initialize runs `make -C <megatron/core/datasets>` on rank 0 to build the dataset helpers. Run from a
# Megatron-LM checkout (docs/training.md), that folder is the checkout's and has the Makefile; here the megatron
# package is the megatron-core wheel's, which ships helpers_cpp already built and no Makefile (make stops with "no
# makefile found" and pretrain_gpt.py exits). Give make a target that only checks the built helpers are there.
DS=$(python3 -c 'import os, megatron.core.datasets as d; print(os.path.dirname(d.__file__))')
if [ ! -f "$DS/Makefile" ]; then
  ls "$DS"/helpers_cpp*.so >/dev/null 2>&1 || { echo "$DS has neither a Makefile nor a built helpers_cpp"; exit 2; }
  printf 'default:\n\t@ls helpers_cpp*.so >/dev/null\n' > "$DS/Makefile" || { echo "cannot write $DS/Makefile"; exit 2; }
fi
CKPT=$(mktemp -d)
REPO=$PWD
run() {  # name, timeout (s), extra flags...
  local name=$1 limit=$2; shift 2
  echo "== $name"
  (cd "$MLM" && BASED_SPEC_CONFIG=$REPO/configs/based-360m.yaml timeout "$limit" \
    python3 -m torch.distributed.run --standalone --nproc_per_node 1 pretrain_gpt.py \
    --spec megatron_based.model.megatron_lm based_layer \
    --num-layers 27 --hidden-size 1024 --num-attention-heads 16 --ffn-hidden-size 2048 \
    --seq-length 2048 --max-position-embeddings 2048 \
    --position-embedding-type none --normalization RMSNorm --norm-epsilon 1e-5 --swiglu --disable-bias-linear \
    --hidden-dropout 0 --attention-dropout 0 --init-method-std 0.02 --make-vocab-size-divisible-by 8 \
    --micro-batch-size 4 --global-batch-size 8 --lr 8e-4 --min-lr 8e-5 \
    --lr-decay-style cosine --lr-warmup-iters 5 --weight-decay 0.1 --adam-beta2 0.95 --clip-grad 1.0 --bf16 \
    --fp32-residual-connection --transformer-impl local --no-gradient-accumulation-fusion --no-persist-layer-norm \
    --use-distributed-optimizer --mock-data --tokenizer-type NullTokenizer --vocab-size 50257 \
    --eval-iters 0 --eval-interval 1000 --log-interval 5 --seed 1234 \
    --save "$CKPT" --save-interval 10 --ckpt-format torch_dist "$@") 2>&1 \
    | grep -v -i "warn\|deprecat" | tee -a "$OUT/megatron_lm.log"
  echo "exit status ${PIPESTATUS[0]}"
}
run "pretrain_gpt.py --spec, iterations 1-20, saves at 10 and 20" 300 --train-iters 20
run "resume from iteration 20 (--load) to 30" 240 --train-iters 30 --load "$CKPT"
python3 - "$OUT/megatron_lm.log" <<'EOF' | tee "$OUT/megatron_lm_summary.txt"
import re, sys
text = open(sys.argv[1]).read()
rows = re.findall(r"iteration\s+(\d+)/\s*(\d+) \|.*?lm loss: ([0-9.E+-]+)", text)
for it, total, loss in rows:
    print(f"iteration {it}/{total}: lm loss {float(loss):.4f}")
first = [float(l) for it, t, l in rows if t.strip() == "20"]
resumed = [(int(it), float(l)) for it, t, l in rows if t.strip() == "30"]
ok = len(first) >= 3 and first[-1] < first[0] and resumed and resumed[0][0] == 25
print("PASS" if ok else "FAIL", f"first run {first}, resumed {resumed}")
EOF
