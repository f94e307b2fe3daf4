#!/usr/bin/env bash
# The fused Taylor kernels (ops.FUSED_FORWARD, ops.FUSED_BACKWARD) against the two-pass default on the GPU machine,
# one process per configuration (benchmarks/taylor_config_check.py: outputs and gradients against fp64 first, then
# fwd+bwd and fwd median ms at B8 T4096 d_v 64 and the shapes below, and the kernels' device ms per fwd+bwd):
# the default, each forward candidate (taylor_attention.py's FUSED_CANDIDATES) with the two-pass backward, then the
# first forward candidate with each backward candidate (FUSED_BWD_CANDIDATES). From the repository root with .whl
# carried; the lines also go to $OUT/taylor_fused.log. About a minute per configuration (imports, compiling, the
# fp64 checks, the timings): in a 10-minute call, run it in parts.
#   bash benchmarks/run_taylor_fused_gpu.sh            # SHAPES="16,2048,64 8,4096,128 1,32768,64" by default
#   BASELINE=0 FORWARD="16 64 8 2;16 64 4 2" BACKWARD="" bash benchmarks/run_taylor_fused_gpu.sh   # a part:
#     no two-pass baseline, these forward tiles, no backward candidates (";" between configurations)
set -o pipefail
source benchmarks/gpu_env.sh || exit 1
OUT=${OUT:-$(mktemp -d)}
log="$OUT/taylor_fused.log"
gpu_banner | tee "$log"
# shellcheck disable=SC2086  # the shapes and tiles are separate arguments
check() {
  timeout "${CHECK_TIMEOUT:-150}" python3 -W ignore benchmarks/taylor_config_check.py "$@" \
    --time ${SHAPES:-16,2048,64 8,4096,128 1,32768,64} --kernels 2>&1 | grep -v -i warn | tail -3 | tee -a "$log"
}
candidates() {  # one line of four numbers per candidate of the named list
  (cd benchmarks && python3 -W ignore -c "import taylor_attention as t
print('\n'.join(' '.join(map(str, c)) for c in t.$1))")
}
[ "${BASELINE:-1}" = 0 ] || check
if [ -n "${FORWARD+set}" ]; then IFS=';' read -r -a forward <<< "$FORWARD"
else mapfile -t forward < <(candidates FUSED_CANDIDATES); fi
if [ -n "${BACKWARD+set}" ]; then IFS=';' read -r -a backward <<< "$BACKWARD"
else mapfile -t backward < <(candidates FUSED_BWD_CANDIDATES); fi
for f in "${forward[@]}"; do check --fused $f; done
first=${forward[0]:-$(candidates FUSED_CANDIDATES | head -1)}
for b in "${backward[@]}"; do check --fused $first --fused-bwd $b; done
