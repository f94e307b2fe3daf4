"""Shared checks of the varlen and NaN contracts of the Triton ops: a bad ``cu_seqlens`` is refused by name, and a
NaN in one input row reaches exactly the outputs and gradients that depend on that row (masked products add an
exact zero, never 0 * NaN)."""
import pytest
import torch

# (offsets for T = 40, what the error names): not starting at 0, falling, ending before T
BAD_CU_SEQLENS = [([3, 20, 40], r"cu_seqlens\[0\] = 3"),
                  ([0, 30, 20, 40], r"cu_seqlens\[2\] = 20 < cu_seqlens\[1\] = 30"),
                  ([0, 20, 30], r"cu_seqlens\[-1\] = 30")]
bad_cu_seqlens = pytest.mark.parametrize("bounds, message", BAD_CU_SEQLENS)


def forward_backward(fn, inputs, seed=3):
    """``fn(*inputs) -> out``; returns ``(out, [d loss / d input])`` for ``loss = sum(out * w)``, fixed random w."""
    leaves = [t.detach().clone().requires_grad_() for t in inputs]
    out = fn(*leaves)
    w = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed)).to(out.device)
    (out.float() * w).sum().backward()
    return out.detach(), [t.grad for t in leaves]


def clean_and_poisoned(fn, inputs, which, row):
    """Both runs of ``forward_backward``: as given, and with NaN written into ``inputs[which][row]``."""
    bad = [t.detach().clone() for t in inputs]
    bad[which][row] = float("nan")
    return forward_backward(fn, inputs), forward_backward(fn, bad)


def assert_equal_where(clean, poisoned, name, *rows):
    """The poisoned run equals the clean one exactly (hence no NaN) at each index ``rows``."""
    for r in rows:
        assert torch.equal(clean[r], poisoned[r]), (name, r, int(poisoned[r].isnan().sum()))
