#!/usr/bin/env bash
# Check the plan for the job's size (no allocation yet), then sbatch launch/slurm.sbatch.
#
#   launch/submit.sh configs/based-360m.yaml [section.key=value ...] [--dry-run]
#
# Environment (defaults in brackets): NNODES [1], GPUS_PER_NODE [8], GRES [gpu:$GPUS_PER_NODE; empty: none],
# TIME [24:00:00], SBATCH_ARGS (extra sbatch flags: --partition, --account, --qos, --wait ...),
# PYTHON [the repository's .venv/bin/python if present, else python3].
set -euo pipefail
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
source "$HERE/common.sh"
parse_args "$@"
NNODES=${NNODES:-1}
GPUS_PER_NODE=${GPUS_PER_NODE:-8}
GRES=${GRES-gpu:$GPUS_PER_NODE}
# The plan is checked here (a login node, usually without GPUs) for the GPU nodes the job asks for: --gpu
dry_run "$NNODES" "$GPUS_PER_NODE" ${GRES:+--gpu}

mkdir -p runs/slurm
# shellcheck disable=SC2086
exec sbatch --nodes="$NNODES" --ntasks-per-node="$GPUS_PER_NODE" ${GRES:+--gres=$GRES} --time="${TIME:-24:00:00}" \
  --export="ALL,BASED_REPO=$(dirname "$HERE"),PYTHON=$PYTHON" ${SBATCH_ARGS:-} "$HERE/slurm.sbatch" "$@"
