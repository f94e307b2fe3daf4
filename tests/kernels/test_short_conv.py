"""Triton short conv / fused BaseConv core vs the fp64 reference: forward, every gradient (u1, u2, weight,
initial state, through the final state too), k = 2..4, state chaining, varlen resets, decode steps, strided
inputs and torch.compile. CPU runs the kernels under TRITON_INTERPRET=1; bf16 at real sizes is marked gpu."""
import pytest
import torch

from based_kernels.short_conv import (base_conv, base_conv_reference, base_conv_step, short_conv,
                                      short_conv_reference, short_conv_step)

DEV = "cuda" if torch.cuda.is_available() else "cpu"


def rel(a, b):
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm()).item()


def rand(*shape, dtype=torch.float32, seed=0):
    g = torch.Generator(device="cpu").manual_seed(seed)
    return torch.randn(*shape, generator=g).to(DEV, dtype).requires_grad_()


def run(gate, x, g, w, init, cu, backend, final=True):
    if gate:
        return base_conv(x, g, w, initial_state=init, output_final_state=final, cu_seqlens=cu, backend=backend)
    return short_conv(x, w, initial_state=init, output_final_state=final, cu_seqlens=cu, backend=backend)


def check_against_fp64(B, T, C, K, has_init, gate, cu, dtype, tol, seed=0):
    N = B if cu is None else len(cu) - 1
    cu = None if cu is None else torch.tensor(cu, device=DEV)
    x, g = rand(B, T, C, dtype=dtype, seed=seed), rand(B, T, C, dtype=dtype, seed=seed + 1)
    w = rand(C, K, seed=seed + 2)  # fp32 weight, as a mixed-precision model keeps it
    init = rand(N, K - 1, C, dtype=dtype, seed=seed + 3) if has_init else None
    inputs = [t for t in (x, g if gate else None, w, init) if t is not None]
    y, fin = run(gate, x, g, w, init, cu, "triton")
    dy, dfin = torch.randn_like(y), torch.randn_like(fin)
    grads = torch.autograd.grad((y * dy).sum() + (fin * dfin).sum(), inputs)

    ref_in = {id(t): t.detach().double().requires_grad_() for t in inputs}
    r = lambda t: None if t is None else ref_in[id(t)]  # noqa: E731
    y_ref, fin_ref = (base_conv_reference(r(x), r(g), r(w), initial_state=r(init), output_final_state=True,
                                          cu_seqlens=cu) if gate else
                      short_conv_reference(r(x), r(w), initial_state=r(init), output_final_state=True,
                                           cu_seqlens=cu))
    grads_ref = torch.autograd.grad((y_ref * dy.double()).sum() + (fin_ref * dfin.double()).sum(),
                                    [r(t) for t in inputs])
    assert y.dtype == dtype and fin.shape == (N, K - 1, C)
    errs = [rel(y, y_ref), rel(fin, fin_ref)] + [rel(a, b) for a, b in zip(grads, grads_ref)]
    assert all(e < tol for e in errs), f"relative errors (y, final, d inputs...) {errs} >= {tol}"


@pytest.mark.parametrize(
    "B, T, C, K, has_init, gate, dtype, tol",
    [
        (2, 37, 40, 3, True, True, torch.float32, 1e-5),  # BaseConv (k = 3), C not a block multiple
        (2, 20, 32, 4, False, True, torch.float32, 1e-5),
        (1, 45, 32, 2, True, False, torch.float32, 1e-5),  # plain short conv
        (2, 2, 32, 4, True, True, torch.float32, 1e-5),  # T < k - 1: the final state reaches into the initial state
        (1, 30, 32, 3, True, True, torch.float16, 3e-3),
    ],
)
def test_forward_and_gradients_match_fp64(B, T, C, K, has_init, gate, dtype, tol):
    check_against_fp64(B, T, C, K, has_init, gate, None, dtype, tol)


@pytest.mark.parametrize("K, has_init", [(3, True), (4, False)])
def test_varlen_matches_per_document_fp64(K, has_init):
    # documents of length 1 and 2 (< k - 1) and a longer one: the conv and its state reset at each start
    check_against_fp64(1, 40, 32, K, has_init, True, [0, 1, 3, 25, 40], torch.float32, 1e-5, seed=7)


def test_initial_state_equals_conv_over_concatenation():
    x = rand(2, 50, 32, seed=10).detach()
    g = rand(2, 50, 32, seed=11).detach()
    w = rand(32, 3, seed=12).detach()
    y_full, fin_full = base_conv(x, g, w, output_final_state=True, backend="triton")
    y1, s1 = base_conv(x[:, :21], g[:, :21], w, output_final_state=True, backend="triton")
    y2, s2 = base_conv(x[:, 21:], g[:, 21:], w, initial_state=s1, output_final_state=True, backend="triton")
    assert rel(torch.cat([y1, y2], 1), y_full) < 1e-6
    assert torch.equal(s2, fin_full) and torch.equal(s1, x[:, 19:21])


def test_decode_steps_equal_full_forward():
    B, T, C, P = 2, 12, 40, 5
    x, g, w = (rand(B, T, C, seed=20).detach(), rand(B, T, C, seed=21).detach(), rand(C, 3, seed=22).detach())
    y_full, _ = base_conv(x, g, w, backend="triton")
    y_pre, state = base_conv(x[:, :P], g[:, :P], w, output_final_state=True, backend="triton")
    ys = [y_pre]
    for t in range(P, T):
        y_t, state = base_conv_step(x[:, t], g[:, t], w, state, backend="triton")
        ys.append(y_t[:, None])
    assert rel(torch.cat(ys, 1), y_full) < 1e-6
    y0, s0 = short_conv_step(x[:, 0], w, None, backend="triton")  # zero state
    assert rel(y0, x[:, 0] * w[:, 2]) < 1e-6 and torch.equal(s0[:, 1], x[:, 0]) and not s0[:, 0].any()


def test_megatron_strided_layout_and_token_major_output():
    """u1, u2 as column slices of an [s, b, 4d] projection seen as [b, s, c]: no copy, same numbers."""
    s, b, c = 30, 2, 32
    u = rand(s, b, 2 * c, seed=30).detach()
    u1, u2 = u[..., :c].transpose(0, 1), u[..., c:].transpose(0, 1)
    w = rand(c, 3, seed=31).detach()
    y, _ = base_conv(u1, u2, w, backend="triton")
    y_ref, _ = base_conv_reference(u1.double(), u2.double(), w.double())
    assert rel(y, y_ref) < 1e-6
    assert y.transpose(0, 1).is_contiguous()


def test_torch_compile_traces_the_custom_op():
    x, g, w = rand(1, 20, 32, seed=40), rand(1, 20, 32, seed=41), rand(32, 3, seed=42)
    f = torch.compile(lambda x, g, w: base_conv(x, g, w, backend="triton")[0], backend="aot_eager", fullgraph=True)
    y = f(x, g, w)
    dw, = torch.autograd.grad(y.square().sum(), [w])
    y_e = base_conv(x, g, w, backend="triton")[0]
    dw_e, = torch.autograd.grad(y_e.square().sum(), [w])
    assert rel(y, y_e) < 1e-7 and rel(dw, dw_e) < 1e-7


def test_backend_dispatch_and_errors():
    x, w = rand(1, 8, 16).detach(), rand(16, 3).detach()
    if DEV == "cpu":
        assert torch.equal(short_conv(x, w)[0], short_conv_reference(x, w)[0])
    with pytest.raises(ValueError, match="backend"):
        short_conv(x, w, backend="cuda")
    with pytest.raises(ValueError, match="2 <= k <= 4"):
        short_conv(x, rand(16, 5).detach(), backend="triton")
    with pytest.raises(ValueError, match="initial_state must be"):
        short_conv(x, w, initial_state=torch.zeros(1, 3, 16, device=DEV), backend="triton")


# ---------------------------------------------------------------- GPU, bf16, real sizes
@pytest.mark.gpu
@pytest.mark.parametrize("K", [2, 3, 4])
@pytest.mark.parametrize("varlen", [False, True])
def test_gpu_bf16_real_sizes(K, varlen):
    B, T, C = (1, 8192, 2048) if varlen else (4, 2048, 2048)
    cu = [0, 3, 1000, 1001, 5000, 8192] if varlen else None
    check_against_fp64(B, T, C, K, True, True, cu, torch.bfloat16, 1e-2, seed=K)


@pytest.mark.gpu
def test_gpu_weight_gradient_is_deterministic():
    x, g, w = rand(8, 4096, 1024, dtype=torch.bfloat16), rand(8, 4096, 1024, dtype=torch.bfloat16), rand(1024, 3)
    y, _ = base_conv(x, g, w)
    dy = torch.randn_like(y)
    first = torch.autograd.grad(y, [x, g, w], dy)
    for _ in range(3):  # repeated calls launch through the cached-kernel fast path
        y2, _ = base_conv(x, g, w)
        again = torch.autograd.grad(y2, [x, g, w], dy)
        assert torch.equal(y, y2) and all(torch.equal(a, b) for a, b in zip(first, again))
