"""Test-wide set-up. TRITON_INTERPRET must be set before any @triton.jit kernel is defined, so it happens here,
before the packages under test are imported: on machines without CUDA, Triton kernels run in the interpreter."""
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
else:
    # in-process tests launch one config per kernel without tuning (tuning compiles every config of every kernel
    # specialization, most of the GPU suite's time): the first, or in the kernel tests a different one per test
    # (tests/kernels/conftest.py); the eager entry-point test and `make demo` tune, as users' runs do
    # (test_entry_points.env).
    os.environ.setdefault("BASED_KERNELS_AUTOTUNE", "0")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        n = torch.cuda.device_count()
        skip = pytest.mark.skip(reason="needs 2+ CUDA GPUs")
        for item in items:
            if "multigpu" in item.keywords and n < 2:
                item.add_marker(skip)
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords or "multigpu" in item.keywords:
            item.add_marker(skip)
