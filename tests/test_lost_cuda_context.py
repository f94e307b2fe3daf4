"""tests/conftest.py's handling of a lost CUDA context: after a test fails with a sticky CUDA error, the in-process
GPU tests of the session skip naming that test, the end-to-end tests (their jobs in processes of their own) still
run, and other failures change nothing."""
from types import SimpleNamespace

import pytest

from tests import conftest


def _report(item, error):
    """Runs conftest's makereport hook for ``item`` failing with ``error`` (None: passing)."""
    call = SimpleNamespace(excinfo=None if error is None else SimpleNamespace(value=error))
    outcome = SimpleNamespace(get_result=lambda: SimpleNamespace(failed=error is not None))
    hook = conftest.pytest_runtest_makereport(item, call)
    next(hook)
    with pytest.raises(StopIteration):
        hook.send(outcome)


def _item(nodeid, keywords=("gpu",), fixtures=()):
    return SimpleNamespace(nodeid=nodeid, keywords=set(keywords), fixturenames=list(fixtures))


def test_sticky_cuda_error_skips_later_gpu_tests(monkeypatch):
    monkeypatch.setattr(conftest, "_cuda_lost", [])
    _report(_item("t::ok"), None)
    _report(_item("t::assert"), AssertionError("2 != 3"))
    _report(_item("t::oom"), RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB"))
    assert conftest._cuda_lost == []
    conftest.pytest_runtest_setup(_item("t::later"))  # nothing lost yet: runs
    _report(_item("t::decode"), RuntimeError("CUDA error: an illegal memory access was encountered\nmore"))
    _report(_item("t::next"), RuntimeError("Triton Error [CUDA]: unspecified launch failure"))
    assert conftest._cuda_lost == ["t::decode", "CUDA error: an illegal memory access was encountered"]
    with pytest.raises(pytest.skip.Exception, match=r"lost in t::decode \(CUDA error: an illegal memory access"):
        conftest.pytest_runtest_setup(_item("t::rope"))
    conftest.pytest_runtest_setup(_item("t::cpu", keywords=()))  # CPU tests run
    conftest.pytest_runtest_setup(_item("t::e2e", fixtures=("gpu_jobs",)))  # the end-to-end tests report their jobs


def test_gpu_order_puts_end_to_end_tests_last(monkeypatch):
    """On a GPU machine the collected tests run in-process tests first, then the end-to-end tests (their jobs run
    beside the others), each group in its collected order."""
    monkeypatch.setattr(conftest.torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(conftest.torch.cuda, "device_count", lambda: 1)
    items = [_item("a::e2e", fixtures=("gpu_jobs",)), _item("a::one"), _item("b::cpu", ()),
             _item("b::e2e", fixtures=("gpu_jobs",)), _item("b::two")]
    conftest.pytest_collection_modifyitems(None, items)
    assert [i.nodeid for i in items] == ["a::one", "b::cpu", "b::two", "a::e2e", "b::e2e"]
