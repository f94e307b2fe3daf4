"""``based_kernels.use_backend``: the process-wide default backend of the public ops (used e.g. to run a whole
model on the PyTorch path on a GPU for parity checks) dispatches every op and restores the previous default."""
import pytest
import torch

import based_kernels
from based_kernels import _common
from based_kernels.short_conv import ops as conv_ops
from based_kernels.sliding_window import ops as swa_ops
from based_kernels.taylor_attention import ops as taylor_ops


def _calls(monkeypatch):
    """Record which Triton entry points run (they still run, under the interpreter on CPU)."""
    seen = []
    for mod, name in ((conv_ops, "conv_triton"), (swa_ops, "swa_triton"), (taylor_ops, "taylor_attention_triton")):
        fn = getattr(mod, name)
        monkeypatch.setattr(mod, name, lambda *a, _fn=fn, _n=name, **kw: (seen.append(_n), _fn(*a, **kw))[1])
    return seen


def _run_all():
    torch.manual_seed(0)
    x = torch.randn(1, 8, 2, 16)
    u = torch.randn(1, 8, 4)
    based_kernels.base_conv(u, u, torch.randn(4, 3))
    based_kernels.sliding_window_attention(x, x, x, window=3)
    based_kernels.taylor_linear_attention(x[..., :4], x[..., :4], x)


def test_use_backend_dispatches_and_restores(monkeypatch):
    seen = _calls(monkeypatch)
    _run_all()  # CPU tensors, no default: the PyTorch paths
    assert seen == []
    with based_kernels.use_backend("triton"):
        _run_all()
        with based_kernels.use_backend("torch"):
            _run_all()
        assert _common._BACKEND[0] == "triton"
    assert sorted(seen) == ["conv_triton", "swa_triton", "taylor_attention_triton"]
    assert _common._BACKEND[0] is None


def test_use_backend_rejects_unknown_names():
    with pytest.raises(ValueError, match="backend must be one of"):
        based_kernels.use_backend("cuda")
    with pytest.raises(ValueError, match="backend must be one of"):
        based_kernels.sliding_window_attention(*[torch.zeros(1, 2, 1, 4)] * 3, window=1, backend="tritn")
