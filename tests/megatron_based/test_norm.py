"""RMSNorm equals the fp64 formula y = x / sqrt(mean(x^2) + eps) * w, gradients too: on the PyTorch path (fused
torch rms_norm, what CPU runs) and forced onto the Triton kernels (under TRITON_INTERPRET=1 on CPU machines)."""
import pytest
import torch

import based_kernels
from megatron_based.model.norm import RMSNorm

interpreter_only = pytest.mark.skipif(torch.cuda.is_available(), reason="CPU tensors through the Triton interpreter")


class _Cfg:
    use_cpu_initialization = True
    params_dtype = torch.float64
    sequence_parallel = False


@pytest.mark.parametrize("backend,dtype,tol", [
    ("torch", torch.float64, 1e-12), ("torch", torch.bfloat16, 1e-2),
    pytest.param("triton", torch.float32, 1e-6, marks=interpreter_only),
    pytest.param("triton", torch.float16, 2e-3, marks=interpreter_only)])
def test_rmsnorm_matches_formula(backend, dtype, tol):
    g = torch.Generator().manual_seed(0)
    norm = RMSNorm(_Cfg(), hidden_size=37, eps=1e-5)
    assert norm.weight.sequence_parallel is False
    with torch.no_grad():
        norm.weight.copy_(torch.rand(37, generator=g, dtype=torch.float64) + 0.5)
    norm = norm.to(dtype)
    x = (torch.randn(5, 3, 37, generator=g, dtype=torch.float64) * 3).to(dtype).requires_grad_()
    with based_kernels.use_backend(backend):
        y = norm(x)
    assert y.dtype == dtype
    x64 = x.detach().double().requires_grad_()
    w64 = norm.weight.detach().double().requires_grad_()
    y64 = x64 * torch.rsqrt(x64.pow(2).mean(-1, keepdim=True) + 1e-5) * w64
    dy = torch.randn(y.shape, generator=g, dtype=torch.float64)
    (y.double() * dy).sum().backward()
    (y64 * dy).sum().backward()
    for a, b in ((y.double(), y64), (x.grad.double(), x64.grad), (norm.weight.grad.double(), w64.grad)):
        assert ((a - b).norm() / b.norm()).item() < tol
