"""RMSNorm (fused torch rms_norm) equals the fp64 formula y = x / sqrt(mean(x^2) + eps) * w, gradients too."""
import pytest
import torch

from megatron_based.norm import RMSNorm


class _Cfg:
    use_cpu_initialization = True
    params_dtype = torch.float64
    sequence_parallel = False


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-12), (torch.bfloat16, 1e-2)])
def test_rmsnorm_matches_formula(dtype, tol):
    g = torch.Generator().manual_seed(0)
    norm = RMSNorm(_Cfg(), hidden_size=37, eps=1e-5)
    with torch.no_grad():
        norm.weight.copy_(torch.rand(37, generator=g, dtype=torch.float64) + 0.5)
    norm = norm.to(dtype)
    x = (torch.randn(5, 3, 37, generator=g, dtype=torch.float64) * 3).to(dtype).requires_grad_()
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

