#!/usr/bin/env bash
# mpirun launcher (Open MPI): one rank per GPU; rank, size, local rank and rank 0's address come from MPI through
# mpi4py (megatron_based/runtime/launch_env.py), so no torchrun is needed. Needs `pip install -e '.[mpi]'` in the checkout.
#
#   launch/mpirun.sh configs/tiny.yaml [section.key=value ...] [--dry-run]
#
# Environment (defaults in brackets):
#   NNODES [1], NPROC_PER_NODE [GPUs per node; 1 without GPUs]: mpirun -np NNODES*NPROC_PER_NODE
#   HOSTFILE     Open MPI hostfile for several nodes (one line per node: "host slots=8")
#   MASTER_ADDR  address rank 0 announces (default: its host name; set it when that name does not resolve to
#                the interface the other nodes reach)
#   MPIRUN       the mpirun command [mpirun]; MPIRUN_ARGS extra flags (e.g. "--oversubscribe")
# As root, Open MPI's mpirun refuses to start without --allow-run-as-root: it is added then (and said so).
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
parse_args "$@"

node_layout
dry_run "$NNODES" "$NPROC_PER_NODE"

HOSTS=()
if [[ -n ${HOSTFILE:-} ]]; then HOSTS=(--hostfile "$HOSTFILE"); fi
EXPORTS=()
for v in PATH PYTHONUNBUFFERED CUDA_DEVICE_MAX_CONNECTIONS TORCH_NCCL_ASYNC_ERROR_HANDLING NCCL_DEBUG OMP_NUM_THREADS \
         MASTER_ADDR MASTER_PORT NCCL_SOCKET_IFNAME GLOO_SOCKET_IFNAME; do
  if [[ -n ${!v:-} ]]; then EXPORTS+=(-x "$v"); fi
done
MPIRUN=${MPIRUN:-mpirun}
ROOT_ARGS=()
# shellcheck disable=SC2086
if [[ $(id -u) == 0 && " ${MPIRUN_ARGS:-} " != *" --allow-run-as-root "* ]] && \
   $MPIRUN --version 2>&1 | grep -qi "open mpi\|open-mpi"; then
  echo "launch: running as root: adding --allow-run-as-root (Open MPI)" >&2
  ROOT_ARGS=(--allow-run-as-root)
fi
# --bind-to none: each rank's PyTorch threads may use all its cores; ppr: NPROC_PER_NODE ranks on every node.
# shellcheck disable=SC2086
exec $MPIRUN -np $(( NNODES * NPROC_PER_NODE )) --map-by "ppr:$NPROC_PER_NODE:node" --bind-to none \
  "${ROOT_ARGS[@]}" "${HOSTS[@]}" "${EXPORTS[@]}" ${MPIRUN_ARGS:-} "$PYTHON" -m megatron_based.training.loop "$CONFIG" "${ARGS[@]}"
