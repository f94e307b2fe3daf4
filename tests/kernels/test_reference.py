"""The plain-PyTorch reference ops against independent fp64 formulas (based-spec.md, "Cases" 1-7)."""
import math

import pytest
import torch

from based_kernels.short_conv.reference import base_conv_reference, short_conv_reference, short_conv_step
from based_kernels.sliding_window.reference import sliding_window_attention_reference
from based_kernels.taylor_attention.reference import (
    feature_map,
    symmetric_feature_map,
    taylor_attention_chunked,
    taylor_attention_quadratic,
    taylor_attention_step,
)

f64 = torch.float64


def rand(*shape, dtype=f64, seed=None):
    g = torch.Generator().manual_seed(seed if seed is not None else hash(shape) % 2**31)
    return torch.randn(*shape, generator=g, dtype=dtype)


def naive_taylor(q, k, v):
    """y_t by an explicit double loop over (t, j <= t) with K = 1 + s + s^2/2: independent of the library code."""
    B, T, H, f = q.shape
    y = torch.empty(B, T, H, v.shape[-1], dtype=f64)
    for t in range(T):
        s = torch.einsum("bhf,bjhf->bjh", q[:, t], k[:, : t + 1]) / math.sqrt(f)
        w = 1 + s + s * s / 2
        y[:, t] = torch.einsum("bjh,bjhd->bhd", w, v[:, : t + 1]) / w.sum(1).unsqueeze(-1)
    return y


def test_feature_maps_give_the_taylor_kernel():
    for f in (4, 16):
        q, k = rand(7, f, seed=1), rand(7, f, seed=2)
        s = (q * k).sum(-1) / math.sqrt(f)
        want = 1 + s + s * s / 2
        assert feature_map(q).shape[-1] == 1 + f + f * f
        assert symmetric_feature_map(q).shape[-1] == 1 + f + f * (f + 1) // 2
        torch.testing.assert_close((feature_map(q) * feature_map(k)).sum(-1), want, atol=1e-12, rtol=0)
        torch.testing.assert_close((symmetric_feature_map(q) * symmetric_feature_map(k)).sum(-1), want,
                                   atol=1e-12, rtol=0)


@pytest.mark.parametrize("T", [1, 63, 64, 65, 300])
def test_quadratic_chunked_recurrent_agree(T):
    B, H, f, d = 2, 3, 8, 5
    q, k, v = rand(B, T, H, f, seed=T), rand(B, T, H, f, seed=T + 1), rand(B, T, H, d, seed=T + 2)
    want = naive_taylor(q, k, v) if T <= 65 else None
    yq, sq = taylor_attention_quadratic(q, k, v, output_final_state=True)
    if want is not None:
        torch.testing.assert_close(yq, want, atol=1e-10, rtol=1e-10)  # eps = 1e-12 in the denominator
    for chunk in (16, 64):
        yc, sc = taylor_attention_chunked(q, k, v, chunk_size=chunk, output_final_state=True)
        torch.testing.assert_close(yc, yq, atol=1e-11, rtol=1e-11)
        torch.testing.assert_close(sc[0], sq[0], atol=1e-9, rtol=1e-11)
        torch.testing.assert_close(sc[1], sq[1], atol=1e-9, rtol=1e-11)
    state, ys = None, []
    for t in range(T):
        y, state = taylor_attention_step(q[:, t], k[:, t], v[:, t], state)
        ys.append(y)
    torch.testing.assert_close(torch.stack(ys, 1), yq, atol=1e-11, rtol=1e-11)
    torch.testing.assert_close(state[0], sq[0], atol=1e-9, rtol=1e-11)


def test_chunked_fp32_gradients_match_fp64_oracle():
    B, T, H, f, d = 1, 97, 2, 8, 6
    leaves64 = [rand(B, T, H, n, seed=10 + i).requires_grad_() for i, n in enumerate((f, f, d))]
    leaves32 = [t.detach().float().requires_grad_() for t in leaves64]
    S0 = (rand(B, H, 1 + f + f * (f + 1) // 2, d, seed=20).abs()).requires_grad_()
    z0 = (rand(B, H, 1 + f + f * (f + 1) // 2, seed=21).abs() + 1).requires_grad_()
    S032, z032 = S0.detach().float().requires_grad_(), z0.detach().float().requires_grad_()
    g = rand(B, T, H, d, seed=30)
    y64, _ = taylor_attention_quadratic(*leaves64, initial_state=(S0, z0))
    y32, _ = taylor_attention_chunked(*leaves32, chunk_size=32, initial_state=(S032, z032))
    (y64 * g).sum().backward()
    (y32 * g.float()).sum().backward()
    assert y32.dtype == torch.float32
    torch.testing.assert_close(y32.double(), y64, atol=1e-5, rtol=1e-5)
    for a, b in zip(leaves32 + [S032, z032], leaves64 + [S0, z0]):
        rel = (a.grad.double() - b.grad).norm() / b.grad.norm()
        assert rel < 1e-5, rel


def test_initial_state_continuation_and_varlen():
    B, T, H, f, d = 1, 90, 2, 4, 3
    q, k, v = rand(B, T, H, f, seed=3), rand(B, T, H, f, seed=4), rand(B, T, H, d, seed=5)
    y, fin = taylor_attention_quadratic(q, k, v, output_final_state=True)
    ya, sa = taylor_attention_chunked(q[:, :37], k[:, :37], v[:, :37], chunk_size=16, output_final_state=True)
    yb, sb = taylor_attention_chunked(q[:, 37:], k[:, 37:], v[:, 37:], chunk_size=16, initial_state=sa,
                                      output_final_state=True)
    torch.testing.assert_close(torch.cat([ya, yb], 1), y, atol=1e-12, rtol=1e-12)
    torch.testing.assert_close(sb[0], fin[0], atol=1e-9, rtol=1e-12)
    cu = torch.tensor([0, 1, 40, 89, 90])
    yv, sv = taylor_attention_chunked(q, k, v, chunk_size=16, cu_seqlens=cu, output_final_state=True)
    for i, (a, b) in enumerate(zip(cu[:-1].tolist(), cu[1:].tolist())):
        yd, sd = taylor_attention_quadratic(q[:, a:b], k[:, a:b], v[:, a:b], output_final_state=True)
        torch.testing.assert_close(yv[:, a:b], yd, atol=1e-12, rtol=1e-12)
        torch.testing.assert_close(sv[0][i : i + 1], sd[0], atol=1e-9, rtol=1e-12)


def causal_jacobian_leak(fn, x, t):
    """Largest |d y_t / d x_j| over j > t."""
    x = x.clone().requires_grad_()
    y = fn(x)
    (g,) = torch.autograd.grad(y[:, t].sum(), x)
    return g[:, t + 1 :].abs().max().item(), g[:, : t + 1].abs().max().item()


def test_causality_of_every_op():
    T = 40
    x = rand(1, T, 2, 8, seed=7)
    ops = {
        "taylor": lambda x: taylor_attention_chunked(x, x * 0.5, x, chunk_size=16)[0],
        "swa": lambda x: sliding_window_attention_reference(x, x * 0.5, x, window=5),
        "conv": lambda x: short_conv_reference(x.flatten(2), rand(16, 3, seed=8))[0],
    }
    for name, fn in ops.items():
        for t in (0, 17, 38):
            leak, dep = causal_jacobian_leak(fn, x, t)
            assert leak == 0.0, (name, t, leak)
            assert dep > 0, (name, t)


def test_swa_window_edge():
    """y_t depends on x_{t-W} and not on x_{t-W-1}; W not a power of two; T < W handled."""
    W, T, t = 5, 20, 15
    x = rand(1, T, 2, 4, seed=9)
    fn = lambda x: sliding_window_attention_reference(x, x, x, window=W)  # noqa: E731
    xg = x.clone().requires_grad_()
    (g,) = torch.autograd.grad(fn(xg)[:, t].sum(), xg)
    assert g[:, t - W].abs().max() > 0
    assert g[:, : t - W].abs().max() == 0
    # Dense softmax by hand, and a window wider than the sequence equals full causal attention.
    q, k, v = rand(1, 9, 2, 4, seed=11), rand(1, 9, 1, 4, seed=12), rand(1, 9, 1, 4, seed=13)
    s = torch.einsum("bthd,bjhd->bhtj", q, k.expand(-1, -1, 2, -1)) / 2.0
    s = s.masked_fill(torch.ones(9, 9, dtype=torch.bool).triu(1), -math.inf)
    want = torch.einsum("bhtj,bjhd->bthd", s.softmax(-1), v.expand(-1, -1, 2, -1))
    torch.testing.assert_close(sliding_window_attention_reference(q, k, v, window=100), want)
    # kv_prefix equals attending over the concatenated sequence.
    kp, vp = rand(1, 3, 1, 4, seed=14), rand(1, 3, 1, 4, seed=15)
    full = sliding_window_attention_reference(torch.cat([rand(1, 3, 2, 4, seed=16), q], 1), torch.cat([kp, k], 1),
                                              torch.cat([vp, v], 1), window=4)
    torch.testing.assert_close(sliding_window_attention_reference(q, k, v, window=4, kv_prefix=(kp, vp)),
                               full[:, 3:])


def test_short_conv_explicit_formula_state_and_step():
    B, T, C, k = 2, 11, 6, 3
    x, w = rand(B, T, C, seed=17), rand(C, k, seed=18)
    want = torch.zeros(B, T, C, dtype=f64)
    for t in range(T):
        for i in range(k):
            j = t - (k - 1) + i
            if j >= 0:
                want[:, t] += w[:, i] * x[:, j]
    y, fin = short_conv_reference(x, w, output_final_state=True)
    torch.testing.assert_close(y, want, atol=1e-12, rtol=0)
    torch.testing.assert_close(fin, x[:, -2:])
    ya, sa = short_conv_reference(x[:, :4], w, output_final_state=True)
    yb, _ = short_conv_reference(x[:, 4:], w, initial_state=sa)
    torch.testing.assert_close(torch.cat([ya, yb], 1), want, atol=1e-12, rtol=0)
    state, ys = None, []
    for t in range(T):
        yt, state = short_conv_step(x[:, t], w, state)
        ys.append(yt)
    torch.testing.assert_close(torch.stack(ys, 1), want, atol=1e-12, rtol=0)
    u2 = rand(B, T, C, seed=19)
    yb, _ = base_conv_reference(x, u2, w)
    torch.testing.assert_close(yb, want * torch.sigmoid(want) * u2, atol=1e-12, rtol=0)
