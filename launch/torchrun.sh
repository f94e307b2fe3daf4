#!/usr/bin/env bash
# torchrun launcher, one node or many. Checks the plan (megatron_based.training.plan) first, then starts one process per GPU.
#
#   launch/torchrun.sh configs/tiny.yaml [section.key=value ...] [--dry-run]
#
# Environment (defaults in brackets):
#   NPROC_PER_NODE  processes on this node [number of GPUs; 1 without GPUs]
#   NNODES          nodes in the job [1]
#   NODE_RANK       this node's rank: set it for a static rendezvous; leave it unset for c10d rendezvous (any node
#                   order, and restarts of any node's workers are coordinated)
#   MASTER_ADDR     host of node 0 / of the c10d rendezvous store [127.0.0.1]; MASTER_PORT [29500]
#                   (one node: torchrun --standalone picks a free port itself)
#   RDZV_ID         job id shared by all nodes for c10d rendezvous [based-$USER]
#   MAX_RESTARTS    how often torchrun restarts the workers after a failure [3]; each restart resumes from the
#                   newest checkpoint (train.load=auto; RESUME=0 turns that off)
#   PYTHON          interpreter [the repository's .venv/bin/python if present, else python3]; TORCHRUN_ARGS
#                   extra torchrun flags
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
parse_args "$@"

node_layout
MASTER_ADDR=${MASTER_ADDR:-127.0.0.1}
MASTER_PORT=${MASTER_PORT:-29500}
dry_run "$NNODES" "$NPROC_PER_NODE"

# Workers must not share the rendezvous store: after a restart they would find the previous attempt's gloo/NCCL
# addresses in it and fail to connect. With this, every round gets a fresh store (c10d rendezvous only; a static
# rendezvous, NODE_RANK set, always shares it, so restarts are reliable with c10d rendezvous).
export TORCH_DISABLE_SHARE_RDZV_TCP_STORE=${TORCH_DISABLE_SHARE_RDZV_TCP_STORE:-1}
# torchrun gives its workers OMP_NUM_THREADS=1 when it is unset, under a four-line banner; the same default, quietly.
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
if [[ -n ${NODE_RANK:-} ]]; then
  RDZV=(--node-rank "$NODE_RANK" --master-addr "$MASTER_ADDR" --master-port "$MASTER_PORT")
elif (( NNODES == 1 )); then
  RDZV=(--standalone)  # a local rendezvous on a free port
else
  RDZV=(--rdzv-backend c10d --rdzv-endpoint "$MASTER_ADDR:$MASTER_PORT" --rdzv-id "${RDZV_ID:-based-${USER:-job}}")
fi
# shellcheck disable=SC2086
exec "$PYTHON" -m torch.distributed.run --nnodes "$NNODES" --nproc-per-node "$NPROC_PER_NODE" "${RDZV[@]}" \
  --max-restarts "${MAX_RESTARTS:-3}" ${TORCHRUN_ARGS:-} -m megatron_based.training.loop "$CONFIG" "${ARGS[@]}"
