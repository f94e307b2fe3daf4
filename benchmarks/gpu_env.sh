# Source on the GPU machine from the repository root: installs the carried wheels (.whl/, see docs/benchmarks.md)
# into /tmp/site and makes this checkout importable (based_kernels is the kernels/ folder).
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
  || { echo "installing the carried wheels failed"; return 1 2>/dev/null || exit 1; }
ln -sfn "$PWD/kernels" /tmp/site/based_kernels
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 CUDA_DEVICE_MAX_CONNECTIONS=1
