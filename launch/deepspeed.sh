#!/usr/bin/env bash
# The DeepSpeed engine (ZeRO-1/2) on the torchrun launcher: same flags and environment as launch/torchrun.sh, plus
#   ZERO_STAGE  DeepSpeed ZeRO stage, 1 or 2 [1]
# The ds_config is generated from the YAML (megatron_based/training/deepspeed_engine.py:ds_config).
#
#   launch/deepspeed.sh configs/tiny.yaml [section.key=value ...] [--dry-run]
set -euo pipefail
exec "$(dirname "${BASH_SOURCE[0]}")/torchrun.sh" "$@" train.engine=deepspeed "train.zero_stage=${ZERO_STAGE:-1}"
