"""split_linear (based_kernels.split_linear) against the fp64 product x @ w^T + b: odd shapes (M, N, K not tile
multiples, a last K slice shorter than the others), every split S (1 = no workspace), with and without bias, 3-D
and strided x, bitwise determinism and the counters left at zero across calls, input errors. CPU runs the kernel
under TRITON_INTERPRET=1 in fp16 (the interpreter truncates when it rounds to bf16); bf16 at the decode sizes of
based-1.3b and inside a CUDA graph are marked gpu."""
import pytest
import torch
import torch.nn.functional as F

from based_kernels.split_linear import default_config, ops, split_linear

DEV = "cuda" if torch.cuda.is_available() else "cpu"
LOW = torch.float16 if DEV == "cpu" else torch.bfloat16


def rel(a, b):
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm()).item()


def make(M, N, K, dtype=LOW, bias=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(M, K, generator=g).to(DEV, dtype)
    w = (torch.randn(N, K, generator=g) / K ** 0.5).to(DEV, dtype)
    b = torch.randn(N, generator=g).to(DEV, dtype) if bias else None
    return x, w, b


def fp64(x, w, b):
    y = x.double() @ w.double().t()
    return y if b is None else y + b.double()


@pytest.mark.parametrize("M, N, K", [(5, 37, 100), (16, 64, 256), (33, 70, 300)])
@pytest.mark.parametrize("S", [1, 2, 3])
@pytest.mark.parametrize("bias", [True, False])
def test_matches_fp64(M, N, K, S, bias):
    """BN 32, BK 32: (5, 37, 100) has two column tiles (the second 5 wide) and K slices of 64 / 36 at S 2, 64 / 32 /
    4 at S 3; errors no larger than F.linear's in the same dtype (fp32 accumulation of rounded products)."""
    x, w, b = make(M, N, K, bias=bias)
    y = split_linear(x, w, b, config=(32, S, 32, 4, 2), backend="triton")
    assert y.shape == (M, N) and y.dtype == x.dtype
    ref = fp64(x, w, b)
    peer = rel(F.linear(x.float(), w.float(), None if b is None else b.float()).to(x.dtype), ref)
    assert rel(y, ref) <= max(2 * peer, 1e-3), (rel(y, ref), peer)


def test_deterministic_and_counters_reset():
    x, w, b = make(20, 96, 512)
    cfg = (32, 4, 32, 4, 2)
    ys = [split_linear(x, w, b, config=cfg, backend="triton") for _ in range(3)]
    assert all(torch.equal(ys[0], y) for y in ys[1:])
    assert int(ops._COUNTERS[x.device][:8].abs().sum()) == 0
    assert rel(ys[0], fp64(x, w, b)) < 1e-3


def test_leading_dims_and_strided_x():
    x, w, b = make(12, 40, 96)
    x3 = torch.cat([x, x], dim=-1)[:, :96].reshape(3, 4, 96)  # row stride 192
    y = split_linear(x3, w, b, config=(32, 2, 32, 4, 2), backend="triton")
    assert y.shape == (3, 4, 40)
    assert rel(y.reshape(12, 40), fp64(x, w, b)) < 1e-3


def test_default_config_splits_only_to_fill_the_sms():
    BN, S, BK, _, _ = default_config(128, 1792, 3584, torch.device(DEV))
    n_sm = ops._sms(torch.device(DEV))
    assert S > 1 and -(-1792 // BN) * S <= n_sm and 3584 // S >= 4 * BK
    assert default_config(128, 50304, 1792, torch.device(DEV))[1] == 1  # enough output tiles already


def test_errors_name_the_problem():
    x, w, b = make(4, 8, 16)
    with pytest.raises(ValueError, match="share K"):
        split_linear(x, w[:, :8])
    with pytest.raises(ValueError, match=r"bias must be \[N\]"):
        split_linear(x, w, b[:4])
    with pytest.raises(RuntimeError, match="forward only"):
        split_linear(x.requires_grad_(), w)
    assert torch.equal(split_linear(x.float().detach(), w.float(), None), F.linear(x.float().detach(), w.float()))


@pytest.mark.gpu
@pytest.mark.parametrize("N, K", [(1792, 3584), (1792, 1792), (7168, 1792)])
def test_bf16_decode_sizes_and_cuda_graph(N, K):
    """based-1.3b's decode products at batch 128 (fc2 / C linear_out, the L / S projections, fc1): default config
    within 2x F.linear's error vs fp64; replayed in a CUDA graph on new inputs, bitwise equal to the eager call."""
    x, w, b = make(128, N, K)
    y = split_linear(x, w, b)
    ref = fp64(x, w, b)
    assert rel(y, ref) <= 2 * rel(F.linear(x, w, b), ref) + 1e-4
    static_x = x.clone()
    g = torch.cuda.CUDAGraph()
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        split_linear(static_x, w, b)
    torch.cuda.current_stream().wait_stream(s)
    with torch.cuda.graph(g):
        out = split_linear(static_x, w, b)
    for seed in (1, 2):
        static_x.copy_(make(128, N, K, seed=seed)[0])
        g.replay()
        assert torch.equal(out, split_linear(static_x, w, b))
