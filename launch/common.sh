# Sourced by the launchers in this folder: the Python to use, the --dry-run check, and sane NCCL defaults.
# Usage inside a launcher:  source "$(dirname "$0")/common.sh"; parse_args "$@"; dry_run NNODES NPROC_PER_NODE
# After parse_args: CONFIG (the YAML), ARGS (overrides and train flags), DRY_RUN_ONLY (1 if --dry-run was given).

# The interpreter: $PYTHON when set, else the repository's .venv (what `make venv` builds; no need to activate it),
# else python3 from PATH. Printed, so a "No module named 'megatron_based'" points at the interpreter that lacks it.
LAUNCH_REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
if [[ -z ${PYTHON:-} ]]; then
  if [[ -x $LAUNCH_REPO/.venv/bin/python ]]; then PYTHON=$LAUNCH_REPO/.venv/bin/python
  else PYTHON=$(command -v python3 || command -v python); fi
fi
echo "launch: python $PYTHON" >&2
export PYTHONUNBUFFERED=1
# Megatron orders its sequence-parallel / TP communication kernels by issue order on one CUDA stream queue.
export CUDA_DEVICE_MAX_CONNECTIONS=${CUDA_DEVICE_MAX_CONNECTIONS:-1}
# A failed or hung collective raises instead of hanging forever, so torchrun / slurm can restart the job.
export TORCH_NCCL_ASYNC_ERROR_HANDLING=${TORCH_NCCL_ASYNC_ERROR_HANDLING:-1}
export NCCL_DEBUG=${NCCL_DEBUG:-WARN}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}

parse_args() {
  DRY_RUN_ONLY=0
  ARGS=()
  CONFIG=""
  for a in "$@"; do
    if [[ $a == --dry-run ]]; then DRY_RUN_ONLY=1
    elif [[ -z $CONFIG ]]; then CONFIG=$a
    else ARGS+=("$a"); fi
  done
  if [[ -z $CONFIG ]]; then
    echo "usage: $0 CONFIG.yaml [section.key=value ...] [--dry-run]" >&2
    exit 2
  fi
  # Resume from the newest checkpoint under train.save whenever there is one (restarts, requeues); start fresh while
  # there is none (train.load=auto; train.load=latest would refuse).
  if [[ ${RESUME:-1} == 1 ]]; then ARGS=(train.load=auto "${ARGS[@]}"); fi  # an explicit train.load= later wins
}

# dry_run NNODES NPROC_PER_NODE [PLAN_FLAGS...]: validate the plan for that many processes (no process group,
# nothing allocated); exits on a bad plan, and after printing it when --dry-run was given. PLAN_FLAGS go to
# megatron_based.training.plan (e.g. --gpu: plan for GPU nodes from a login node).
dry_run() {
  "$PYTHON" -m megatron_based.training.plan "$CONFIG" "${ARGS[@]}" --nnodes "$1" --nproc-per-node "$2" "${@:3}" || exit $?
  if [[ $DRY_RUN_ONLY == 1 ]]; then exit 0; fi
}

# node_layout: NNODES [1] and NPROC_PER_NODE [GPUs on this node; 1 without GPUs], unless set by the caller.
node_layout() {
  NNODES=${NNODES:-1}
  local gpus
  gpus=$(count_gpus)
  NPROC_PER_NODE=${NPROC_PER_NODE:-$(( gpus > 0 ? gpus : 1 ))}
}

# GPUs on this node (0 without NVIDIA GPUs).
count_gpus() {
  if command -v nvidia-smi >/dev/null 2>&1; then nvidia-smi -L 2>/dev/null | grep -c '^GPU' || true
  else echo 0; fi
}
