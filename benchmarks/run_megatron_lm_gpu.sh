#!/usr/bin/env bash
# Megatron-LM's own pretrain_gpt.py training BASED through --spec (docs/training.md, "Training with Megatron-LM's
# pretrain_gpt.py") on one GPU: the documented flags at based-360m's size, mock data, bf16, the distributed
# optimizer; iterations 1-20 of 30 with saves at 10 and 20, then a resume from iteration 20 (--load) to 30 (see below
# for the optimizer it runs with). Checks (megatron_lm_summary.txt, PASS / FAIL): the loss falls and both saves are
# written; the resume continues at iteration 21 with 21 batches consumed, runs to 30 and saves there.
#   PLAIN_ONLY=1 bash benchmarks/run_megatron_lm_gpu.sh   # only the pair without the distributed optimizer
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
REPO=$PWD
GLOBAL_BATCH=8
run() {  # log name, title, timeout (s), extra flags...
  local log=$1 name=$2 limit=$3; shift 3
  echo "== $name"
  (cd "$MLM" && BASED_SPEC_CONFIG=$REPO/configs/based-360m.yaml timeout "$limit" \
    python3 -m torch.distributed.run --standalone --nproc_per_node 1 pretrain_gpt.py \
    --spec megatron_based.model.megatron_lm based_layer \
    --num-layers 27 --hidden-size 1024 --num-attention-heads 16 --ffn-hidden-size 2048 \
    --seq-length 2048 --max-position-embeddings 2048 \
    --position-embedding-type none --normalization RMSNorm --norm-epsilon 1e-5 --swiglu --disable-bias-linear \
    --hidden-dropout 0 --attention-dropout 0 --init-method-std 0.02 --make-vocab-size-divisible-by 8 \
    --micro-batch-size 4 --global-batch-size $GLOBAL_BATCH --lr 8e-4 --min-lr 8e-5 \
    --lr-decay-style cosine --lr-warmup-iters 5 --weight-decay 0.1 --adam-beta2 0.95 --clip-grad 1.0 --bf16 \
    --fp32-residual-connection --transformer-impl local --no-gradient-accumulation-fusion --no-persist-layer-norm \
    --mock-data --tokenizer-type NullTokenizer --vocab-size 50257 \
    --eval-iters 0 --eval-interval 1000 --log-interval 5 --seed 1234 \
    --save-interval 10 --ckpt-format torch_dist "$@") 2>&1 \
    | grep -v -i "warn\|deprecat" > "$OUT/megatron_lm_$log.log"
  local rc=${PIPESTATUS[0]}
  grep -E "iteration +[0-9]+/|saved checkpoint|Error|error:" "$OUT/megatron_lm_$log.log" | grep -v "error_file" | tail -12
  echo "exit status $rc"
}
# With the distributed optimizer (the documented set-up): iterations 1-20 of 30, saves at 10 and 20, then the resume.
# Each first run stops at 20 (--exit-interval), so the resume keeps the same LR schedule (Megatron's scheduler
# refuses a checkpoint whose total iterations differ). Without Transformer Engine or apex, megatron-core 0.19's
# distributed optimizer cannot load a checkpoint (torch Adam's init_state_fn gives a fresh optimizer no `step`, and
# DistributedOptimizer.state_dict asserts one common step), so there the resume runs with Megatron-LM's other
# optimizer (no --use-distributed-optimizer), from its own first run.
A=$(mktemp -d); B=$(mktemp -d)
[ -z "$PLAIN_ONLY" ] && run distopt "pretrain_gpt.py --spec, distributed optimizer, iterations 1-20 of 30, saves at 10 and 20" \
  300 --use-distributed-optimizer --train-iters 30 --exit-interval 20 --save "$A"
if [ -z "$PLAIN_ONLY" ] && python3 -c 'import megatron.core.optimizer.distrib_optimizer as d, sys; sys.exit(0 if d.HAVE_APEX_OR_TE else 1)'; then
  run distopt_resume "resume from iteration 20 (--load) to 30, distributed optimizer" 240 \
    --use-distributed-optimizer --train-iters 30 --load "$A" --save "$A"
else
  echo "(no Transformer Engine or apex: the resume runs without --use-distributed-optimizer)"
  run plain "pretrain_gpt.py --spec, Megatron-LM's mixed-precision optimizer, iterations 1-20 of 30" 240 \
    --train-iters 30 --exit-interval 20 --save "$B"
  run plain_resume "resume from iteration 20 (--load) to 30, same optimizer" 240 --train-iters 30 --load "$B" --save "$B"
fi
python3 - "$OUT" "$GLOBAL_BATCH" <<'PY' | tee "$OUT/megatron_lm_summary.txt"
import os, re, sys
GLOBAL_BATCH = int(sys.argv[2])
def rows(name):  # [(iteration, consumed samples, lm loss)], [iterations saved]
    path = os.path.join(sys.argv[1], f"megatron_lm_{name}.log")
    text = open(path).read() if os.path.exists(path) else ""
    found = re.findall(r"iteration\s+(\d+)/\s*\d+ \| consumed samples:\s+(\d+) \|.*?lm loss: ([0-9.E+-]+)", text)
    saved = [int(i) for i in re.findall(r"successfully saved checkpoint from iteration\s+(\d+)", text)]
    return [(int(i), int(c), float(l)) for i, c, l in found], saved
runs = {name: rows(name) for name in ("distopt", "distopt_resume", "plain", "plain_resume")}
def trained(name):  # the loss falls over iterations 1-20 and both saves were written
    losses, saved = runs[name]
    return len(losses) >= 4 and losses[-1][0] == 20 and losses[-1][2] < losses[0][2] and saved[-2:] == [10, 20]
def resumed(first, name):  # continues at iteration 21 with 21 batches consumed, runs to 30 and saves there, with
    losses, saved = runs[name]  # its loss below the first run's start
    return (bool(losses) and losses[0][:2] == (21, 21 * GLOBAL_BATCH) and losses[-1][0] == 30 and saved == [30]
            and losses[-1][2] < runs[first][0][0][2])
for name, (losses, saved) in runs.items():
    print(f"{name}: (iteration, consumed samples, lm loss) {losses or 'not run'}, saved at {saved}")
ok = all(trained(n) for n in ("distopt", "plain") if runs[n][0]) and any(
    resumed(a, b) for a, b in (("distopt", "distopt_resume"), ("plain", "plain_resume")) if runs[a][0])
print("PASS" if ok else "FAIL")
PY
