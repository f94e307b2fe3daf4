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


class _Bf16ResidualCfg:
    use_cpu_initialization = True
    params_dtype = torch.bfloat16
    sequence_parallel = False
    fp32_residual_connection = True


@pytest.mark.parametrize("backend", ["torch", pytest.param("triton", marks=interpreter_only)])
def test_fp32_residual_is_normed_into_the_compute_dtype(backend):
    """fp32_residual_connection: an fp32 input (the residual stream) comes out in the weights' dtype (bf16), from fp32
    statistics of the unrounded input (within one bf16 spacing of the fp64 formula; the interpreter truncates); the
    gradient goes back in fp32. A bf16 input stays bf16 in, bf16 out."""
    g = torch.Generator().manual_seed(0)
    norm = RMSNorm(_Bf16ResidualCfg(), hidden_size=45, eps=1e-5)
    with torch.no_grad():
        norm.weight.copy_(torch.rand(45, generator=g) + 0.5)
    x = (torch.randn(5, 3, 45, generator=g) * 3).requires_grad_()
    with based_kernels.use_backend(backend):
        y = norm(x)
        assert norm(x.detach().bfloat16()).dtype == torch.bfloat16
    assert y.dtype == torch.bfloat16
    x64, w64 = x.detach().double(), norm.weight.detach().double()
    y64 = x64 * torch.rsqrt(x64.pow(2).mean(-1, keepdim=True) + 1e-5) * w64
    spacing = torch.exp2(torch.floor(torch.log2(y64.abs())) - 7)
    assert ((y.double() - y64).abs() <= spacing).all()
    y.float().sum().backward()
    assert x.grad.dtype == torch.float32 and torch.isfinite(x.grad).all()
