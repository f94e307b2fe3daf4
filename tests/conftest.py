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
    # Megatron's fused bias-dropout-add (torch.compile'd) meets many models in one process here (dtypes, training
    # and no-grad forwards: a recompile each); at dynamo's default limit of 8 it fell back to eager with a warning
    # mid-suite. A run builds one model and stays under it.
    import torch._dynamo

    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)

from megatron_based.runtime import noise  # noqa: E402  (after TRITON_INTERPRET)


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        n = torch.cuda.device_count()
        skip = pytest.mark.skip(reason="needs 2+ CUDA GPUs")
        for item in items:
            if "multigpu" in item.keywords and n < 2:
                item.add_marker(skip)
        # the end-to-end jobs' tests last: their jobs start with the session (gpu_jobs) and run beside the others
        items.sort(key=lambda item: "gpu_jobs" in getattr(item, "fixturenames", ()))
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords or "multigpu" in item.keywords:
            item.add_marker(skip)


# CUDA errors that leave the process's CUDA context unusable: every later CUDA call of the process fails with them
_STICKY_CUDA_ERRORS = ("illegal memory access", "unspecified launch failure", "misaligned address",
                       "illegal instruction", "hardware stack error")
_cuda_lost: list[str] = []  # the test in which this process's CUDA context was lost, and the error


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """Notes the first test whose failure is a sticky CUDA error (above): the GPU tests after it skip, naming it
    (``pytest_runtest_setup``), instead of failing with the same error, so the report points at the test that lost
    the context."""
    outcome = yield
    report = outcome.get_result()
    if report.failed and call.excinfo is not None and not _cuda_lost:
        message = str(call.excinfo.value).lower()
        if any(error in message for error in _STICKY_CUDA_ERRORS):
            _cuda_lost.extend([item.nodeid, str(call.excinfo.value).strip().splitlines()[0][:200]])


def pytest_runtest_setup(item):
    """After a lost CUDA context (``pytest_runtest_makereport``) the in-process GPU tests skip; the end-to-end tests
    (fixture ``gpu_jobs``: their jobs run in processes of their own) still report their jobs."""
    if _cuda_lost and ("gpu" in item.keywords or "multigpu" in item.keywords) \
            and "gpu_jobs" not in getattr(item, "fixturenames", ()):
        pytest.skip(f"this process's CUDA context was lost in {_cuda_lost[0]} ({_cuda_lost[1]})")


@pytest.fixture(scope="session")
def gpu_jobs(request, tmp_path_factory):
    """{test name: future} of the selected GPU end-to-end jobs (tests/megatron_based/test_entry_points.py's
    start_gpu_jobs: training kill / resume, generate, eval, ``make demo``; each a chain of fresh processes)."""
    from tests.megatron_based.test_entry_points import start_gpu_jobs

    with start_gpu_jobs(request.session.items, tmp_path_factory) as futures:
        yield futures


# GPU memory the in-process tests leave to the end-to-end jobs beside them (up to five processes of tiny models:
# two training runs, generate, eval, make demo). Without a cap the test process's caching allocator kept 74 GiB of an
# 80 GiB H100 and a job's first allocation failed.
JOBS_RESERVE_GIB = 16
_share = []  # this process's bytes of the GPU while the jobs run beside it


@pytest.fixture(scope="session", autouse=True)
def _start_gpu_jobs_first(request):
    """On a GPU the end-to-end jobs start before the first test and run beside the in-process tests (their own
    tests come last, pytest_collection_modifyitems): the GPU suite takes about as long as its in-process tests.
    Meanwhile this process may use the GPU's memory less JOBS_RESERVE_GIB (its allocator frees cached blocks
    before it would exceed that) and returns its cached blocks after each test (``_return_cached_memory``)."""
    if torch.cuda.is_available() and any("gpu_jobs" in getattr(i, "fixturenames", ()) for i in request.session.items):
        total = torch.cuda.get_device_properties(0).total_memory
        fraction = max(0.5, 1 - JOBS_RESERVE_GIB * 2 ** 30 / total)
        torch.cuda.set_per_process_memory_fraction(fraction)
        _share.append(fraction * total)
        request.getfixturevalue("gpu_jobs")
        yield
    else:
        yield


@pytest.fixture(autouse=True)
def _known_warnings_filtered():
    """The third-party warnings the entry points hide (megatron_based.runtime.noise) are hidden in every test too
    (pytest resets the warnings filters per test, to pyproject's filterwarnings)."""
    noise.filter_known_warnings()


@pytest.fixture(autouse=True)
def _return_cached_memory(request):
    """While the end-to-end jobs share the GPU: this process's cached, unused blocks go back after each test, and a
    test whose peak allocation passes half of this process's share says so (the tests that decide the share)."""
    if _share and not _cuda_lost:
        torch.cuda.reset_peak_memory_stats()
    yield
    if _share and not _cuda_lost:  # (after a lost context every CUDA call raises)
        peak = torch.cuda.max_memory_allocated()
        if peak > _share[0] / 2:
            print(f"\n{request.node.nodeid}: peak {peak / 2 ** 30:.1f} GiB allocated")
        torch.cuda.empty_cache()
