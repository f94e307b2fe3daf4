# Source on the GPU machine from the repository root: makes this checkout importable (based_kernels is the kernels/
# folder, linked into /tmp/site) and installs the carried wheels (.whl/, see docs/benchmarks.md) there. Returns 1 if
# the wheels do not install; the checkout is importable either way (scripts that can go on with what the machine
# has installed do so).
mkdir -p /tmp/site && ln -sfn "$PWD/kernels" /tmp/site/based_kernels
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 CUDA_DEVICE_MAX_CONNECTIONS=1
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
  || { echo "installing the carried wheels failed"; return 1 2>/dev/null || exit 1; }
