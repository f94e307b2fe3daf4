# Source on the GPU machine from the repository root: makes this checkout importable (PYTHONPATH=$PWD: the packages
# based_kernels and megatron_based are folders at the repository root) and installs the carried wheels (.whl/, see
# docs/benchmarks.md) into /tmp/site, also on PYTHONPATH. Returns 1 if the wheels do not install; the checkout is
# importable either way (scripts that can go on with what the machine has installed do so).
# gpu_banner: the GPU (name, driver, memory, clocks) and the torch / Triton / megatron-core versions, for the logs
# (warnings off: importing megatron.core warns about Transformer Engine / Apex, and compiles with SyntaxWarnings)
gpu_banner() {
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.mem --format=csv,noheader
  python3 -W ignore -c 'import torch, triton, megatron.core as m
print("torch", torch.__version__, "triton", triton.__version__, "megatron-core", m.__version__)'
}
mkdir -p /tmp/site
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1
# Triton's cache in the checkout (.triton-cache/, git-ignored). run_gpu_suite.sh returns its compiled kernels as
# triton_cache.tar.xz (or, over the machine's 16 MB per file, its parts triton_cache.tar.xz.0, .1, ...); saved as
# .triton-cache.tar.xz (.0, .1, ...) in the checkout (git-ignored) and carried to the next call, it is unpacked here
# (benchmarks/triton_cache.py; once per machine: the scripts source this file several times per call), and that call
# does not compile again the kernels whose source and options did not change (Triton's cache groups name their files
# by absolute path: it hits where the checkout has the path of the one that filled it, as each call's copy does).
mkdir -p .triton-cache
[ -f .triton-cache/.unpacked ] || { python3 benchmarks/triton_cache.py unpack .triton-cache.tar.xz .triton-cache \
  && touch .triton-cache/.unpacked; } || echo "unpacking the carried Triton cache failed: its kernels compile again"
export TRITON_CACHE_DIR=${TRITON_CACHE_DIR:-$PWD/.triton-cache}
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 CUDA_DEVICE_MAX_CONNECTIONS=1
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
  || { echo "installing the carried wheels failed"; return 1 2>/dev/null || exit 1; }
# `make demo` and `make test-gpu` as the README writes them: a .venv over this machine's Python (its torch and triton)
# and the wheels above, with this checkout installed editable (the megatron-based-* commands), stamped so make does
# not try to rebuild it from the network.
if [ ! -f .venv/.installed ]; then
  python3 -m venv .venv && {
    echo /tmp/site; python3 -c 'import site; print("\n".join(site.getsitepackages()))'
  } > .venv/lib/python3.12/site-packages/00-gpu-machine.pth \
  && .venv/bin/python -m pip install -q --no-index --no-deps --no-build-isolation -e . \
  && touch .venv/.installed || echo "building .venv failed: make demo / make test-gpu will try the network"
fi
