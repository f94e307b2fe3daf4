"""Every kernel's grid: CUDA's first grid axis takes 2^31 - 1 programs, the second and third 65,535 each, so what grows
with the input (batch, batch x heads, token blocks, chunks, documents) must go on the first axis (``based_kernels``
README, "Grids"). On CPU: every ``Launcher`` of the package launches at shapes whose batch, batch x heads, token
blocks and documents exceed a small cap, and no launch's second or third axis passes it. On the GPU: the launches
whose shapes went on the capped axes before, past 65,535 there, against the same op on the batch's two halves (each
sequence's programs do not depend on the others', so the results are equal)."""
import pytest
import torch

import based_kernels
from based_kernels import _common
from based_kernels.rms_norm import add_rms_norm
from based_kernels.short_conv import (base_conv_packed, base_conv_packed_step, base_conv_step, short_conv,
                                      short_conv_step)
from based_kernels.short_conv import ops as conv_ops
from based_kernels.short_conv.backward import CHUNK
from based_kernels.short_conv.reference import short_conv_reference
from based_kernels.sliding_window import sliding_window_attention, sliding_window_step
from based_kernels.taylor_attention import taylor_linear_attention, taylor_linear_attention_step
from based_kernels.taylor_attention.ops import feature_dim

DEV = "cuda" if torch.cuda.is_available() else "cpu"
CAP = 4  # the second and third axes' cap in the CPU test: every shape below puts more than this on them before


def _name(launcher):
    return launcher.kernel.fn.__name__


def _randn(*shape, dtype=torch.float32, grad=False, seed=0):
    g = torch.Generator(device="cpu").manual_seed(seed)
    return torch.randn(*shape, generator=g).to(DEV, dtype).requires_grad_(grad)


def _backward(out, *inputs):
    outs = out if isinstance(out, (tuple, list)) else (out,)
    outs = [o for o in outs if isinstance(o, torch.Tensor) and o.requires_grad]
    return torch.autograd.grad(sum((o.float() * (1 + o.float().detach().sin())).sum() for o in outs),
                               [t for t in inputs if t.requires_grad], allow_unused=True)


def _taylor(B, T, H, F, DV, seed=0):
    q, k = ((_randn(B, T, H, F, seed=seed + i) * 0.5).requires_grad_() for i in range(2))
    v = _randn(B, T, H, DV, grad=True, seed=seed + 2)
    y, _ = taylor_linear_attention(q, k, v, backend="triton")
    return (y, *_backward(y, q, k, v))


def _taylor_steps(B, H, F, DV, seed=0):
    q, k = (_randn(B, H, F, seed=seed + i) * 0.5 for i in range(2))
    v = _randn(B, H, DV, seed=seed + 2)
    D = feature_dim(F)
    S, z = _randn(B, H, D, DV, seed=seed + 3), _randn(B, H, D, seed=seed + 4).abs() + 1
    y, (S1, z1) = taylor_linear_attention_step(q, k, v, (S, z), backend="triton")
    S2, z2 = S.clone(), z.clone()
    y2, _ = taylor_linear_attention_step(q, k, v, (S2, z2), backend="triton", inplace=True)
    return y, S1, z1, y2, S2, z2


def _swa(B, T, H, D, W, seed=0):
    q, k, v = (_randn(B, T, H, D, grad=True, seed=seed + i) for i in range(3))
    o = sliding_window_attention(q, k, v, window=W, backend="triton")
    return (o, *_backward(o, q, k, v))


def _swa_step(B, H, D, W, seed=0):
    q, k, v = (_randn(B, H, D, seed=seed + i) for i in range(3))
    kc, vc = (_randn(B, W + 1, H, D, seed=seed + 3 + i) for i in range(2))
    positions = torch.arange(B, device=DEV) % (3 * W)
    o = sliding_window_step(q, k, v, kc, vc, positions, window=W, backend="triton")
    return o, kc, vc


def _conv(B, T, C, K, seed=0):
    x, g = (_randn(B, T, C, grad=True, seed=seed + i) for i in range(2))
    w = _randn(C, K, grad=True, seed=seed + 2)
    init = _randn(B, K - 1, C, grad=True, seed=seed + 3)
    y, fin = short_conv(x, w, initial_state=init, output_final_state=True, backend="triton")
    return (y, fin, *_backward((y, fin), x, w, init))


def _conv_step(B, C, K, seed=0):
    x, g = (_randn(B, C, seed=seed + i) for i in range(2))
    w = _randn(C, K, seed=seed + 2)
    state = _randn(B, K - 1, C, seed=seed + 3)
    return short_conv_step(x, w, state, backend="triton")


def test_no_launch_grows_a_capped_grid_axis(monkeypatch):
    seen = []
    call = _common.Launcher.__call__

    def spy(self, grid, args, **consts):
        def recorded(meta):
            g = tuple(grid(meta))
            seen.append((_name(self), g))
            return g
        return call(self, recorded, args, **consts)

    monkeypatch.setattr(_common.Launcher, "__call__", spy)
    B, H = 3, 2  # batch x heads 6 > CAP; heads alone are allowed on a second axis
    _taylor(B, 40, H, 4, 8)  # chunk 32 under the interpreter: 2 chunks per sequence
    with monkeypatch.context() as m:  # the output pass as one kernel too
        from based_kernels.taylor_attention import ops as taylor_ops
        m.setattr(taylor_ops, "OUTPUT_SPLIT", not taylor_ops.OUTPUT_SPLIT)
        _taylor(B, 40, H, 4, 8)
    _taylor_steps(B, H, 4, 8)
    kb, vb = _randn(B, H, 4, 4), _randn(B, H, 4, 8)
    D = feature_dim(4)
    taylor_linear_attention_step(_randn(B, H, 4), _randn(B, H, 4), _randn(B, H, 8),
                                 (_randn(B, H, D, 8), _randn(B, H, D).abs() + 1), backend="triton", inplace=True,
                                 buffer=(kb, vb, torch.zeros(B, H, dtype=torch.int32, device=DEV)))
    _swa(B, 5 * 16, H, 16, 8)  # > CAP query / key blocks of the interpreter's 16 rows
    cu = torch.tensor([0, 10, 20, 30, 50, 80], dtype=torch.int32, device=DEV)
    q, k, v = (_randn(1, 80, H, 16, grad=True, seed=i) for i in range(3))
    kp, vp = (_randn(1, 5, H, 16, grad=True, seed=5 + i) for i in range(2))
    o = sliding_window_attention(q, k, v, window=8, kv_prefix=(kp, vp), backend="triton")
    _backward(o, q, k, v, kp, vp)
    o = sliding_window_attention(q, k, v, window=8, cu_seqlens=cu, backend="triton")
    _backward(o, q, k, v)
    _swa_step(2 * CAP + 1, H, 16, 4)
    for variant in ("tile", "stream"):
        monkeypatch.setattr(conv_ops, "BWD_VARIANT", variant)
        _conv(B + 2, 5 * conv_ops.CHUNK, 8, 3)  # batch 5, > CAP token blocks and chunks
        x, w = _randn(1, 80, 8, grad=True), _randn(8, 3, grad=True)
        init = _randn(5, 2, 8, grad=True)
        y, fin = short_conv(x, w, initial_state=init, output_final_state=True, cu_seqlens=cu, backend="triton")
        _backward((y, fin), x, w, init)  # 5 documents' initial-state gradients
        u = _randn(B + 2, 40, 16, grad=True)
        y, fin = base_conv_packed(u, _randn(8, 3, grad=True), initial_state=_randn(B + 2, 2, 8),
                                  output_final_state=True, backend="triton")
        _backward((y, fin), u)
    _conv_step(B + 2, 8, 3)
    base_conv_step(_randn(B + 2, 8), _randn(B + 2, 8), _randn(8, 3), _randn(B + 2, 2, 8), backend="triton")
    base_conv_packed_step(_randn(B + 2, 16), _randn(8, 3), _randn(B + 2, 2, 8), backend="triton")
    qkv = _randn(5, B + 2, 2, 3 * 8, grad=True)  # s x b rows, 2 query groups (on the second axis: allowed)
    _backward(based_kernels.rope_split_qkv(qkv, 2, 8, backend="triton"), qkv)
    x, w = _randn(5 * 64, 16, grad=True), _randn(16, grad=True)
    _backward(based_kernels.rms_norm(x, w, backend="triton"), x, w)
    add_rms_norm(x.detach(), x.detach(), w.detach(), backend="triton")
    logits = _randn(5 * 8, 40, grad=True)
    loss = based_kernels.vocab_parallel_cross_entropy(logits, torch.randint(0, 40, (40,), device=DEV),
                                                      backend="triton")
    _backward(loss, logits)

    every = {_name(launcher) for launcher in _common.Launcher.instances}
    assert {name for name, _ in seen} == every, every ^ {name for name, _ in seen}
    over = sorted({(name, g) for name, g in seen if any(n > CAP for n in g[1:])})
    assert not over, f"grids past {CAP} programs on a second or third axis: {over}"


# ------------------------------------------------------------------------------------------------- on the GPU
BIG = 65_537  # past CUDA's 65,535 programs on a grid's second and third axes


def _split(t, d, lo, hi):
    return t.detach().narrow(d, lo, hi - lo).clone().requires_grad_(t.requires_grad)


@pytest.mark.gpu
def test_gpu_batch_times_heads_past_a_grid_axis():
    """Taylor attention's backward (its dd prep launched batch x heads on the second axis) and both decode steps,
    SWA forward and backward and its decode step, short conv forward, backward (the initial state's gradient) and
    step, at batch x heads = 65,537: equal to the same ops on two parts of the batch (each below the cap)."""
    torch.manual_seed(0)
    B, h = BIG, BIG // 2

    def parts(make, run, dims_in):
        inputs = make()
        whole = run(*inputs)
        lo = run(*[_split(t, d, 0, h) if d is not None else t for t, d in zip(inputs, dims_in)])
        hi = run(*[_split(t, d, h, B) if d is not None else t for t, d in zip(inputs, dims_in)])
        return whole, lo, hi

    def check(whole, lo, hi, dims_out):
        for name, (w, a, b, d) in enumerate(zip(whole, lo, hi, dims_out)):
            if d is None:  # a weight's gradient (fp32 partials summed): the parts' sum up to its rounding
                tol = 1e-4 * max(t.abs().max().item() for t in (w, a, b))
                torch.testing.assert_close(w.float(), (a + b).float(), rtol=0, atol=tol)
                continue
            assert torch.equal(w.narrow(d, 0, h), a), f"output {name}: the first part differs"
            assert torch.equal(w.narrow(d, h, B - h), b), f"output {name}: the second part differs"

    def grads(out, *inputs):
        outs = out if isinstance(out, tuple) else (out,)
        loss = sum((o.float() * (1 + o.float().detach().sin())).sum() for o in outs)
        return torch.autograd.grad(loss, inputs)

    # Taylor attention, H 1: its dd prep had B x H on the second axis
    def taylor_in():
        return ([torch.randn(B, 16, 1, 16, device="cuda", dtype=torch.bfloat16).mul(0.5).requires_grad_()
                 for _ in range(2)] + [torch.randn(B, 16, 1, 32, device="cuda", dtype=torch.bfloat16).requires_grad_()])

    def taylor_run(q, k, v):
        y, _ = taylor_linear_attention(q, k, v, backend="triton")
        return (y, *grads(y, q, k, v))

    check(*parts(taylor_in, taylor_run, [0, 0, 0]), [0, 0, 0, 0])

    D = feature_dim(16)

    def taylor_step_in():
        return [torch.randn(B, 1, 16, device="cuda"), torch.randn(B, 1, 16, device="cuda"),
                torch.randn(B, 1, 32, device="cuda"), torch.randn(B, 1, D, 32, device="cuda"),
                torch.rand(B, 1, D, device="cuda") + 1]

    def taylor_step_run(q, k, v, S, z):
        y, (S1, z1) = taylor_linear_attention_step(q, k, v, (S, z), backend="triton")
        S2, z2 = S.clone(), z.clone()
        y2, _ = taylor_linear_attention_step(q, k, v, (S2, z2), inplace=True, backend="triton")
        return y, S1, z1, y2, S2, z2

    check(*parts(taylor_step_in, taylor_step_run, [0] * 5), [0] * 6)

    # sliding-window attention, H 1: the forward's and backward's (blocks, B x H) and the step's (H, B)
    def swa_in():
        return [torch.randn(B, 16, 1, 16, device="cuda", dtype=torch.bfloat16).requires_grad_() for _ in range(3)]

    def swa_run(q, k, v):
        o = sliding_window_attention(q, k, v, window=4, backend="triton")
        return (o, *grads(o, q, k, v))

    check(*parts(swa_in, swa_run, [0, 0, 0]), [0, 0, 0, 0])

    def swa_step_in():
        return ([torch.randn(B, 1, 16, device="cuda", dtype=torch.bfloat16) for _ in range(3)]
                + [torch.randn(B, 5, 1, 16, device="cuda", dtype=torch.bfloat16) for _ in range(2)]
                + [torch.arange(B, device="cuda") % 11])

    def swa_step_run(q, k, v, kc, vc, pos):
        return sliding_window_step(q, k, v, kc, vc, pos, window=4, backend="triton"), kc, vc

    check(*parts(swa_step_in, swa_step_run, [0] * 6), [0, 0, 0])

    # short conv: (channel blocks, token blocks, B) and the initial state's gradient (channel blocks, B)
    def conv_in():
        return [torch.randn(B, 8, 16, device="cuda", dtype=torch.bfloat16).requires_grad_(),
                torch.randn(16, 4, device="cuda").requires_grad_(),
                torch.randn(B, 3, 16, device="cuda", dtype=torch.bfloat16).requires_grad_()]

    def conv_run(x, w, init):
        y, fin = short_conv(x, w, initial_state=init, output_final_state=True, backend="triton")
        dx, dw, dinit = grads((y, fin), x, w, init)
        return y, fin, dx, dw, dinit

    check(*parts(conv_in, conv_run, [0, None, 0]), [0, 0, 0, None, 0])

    def conv_step_in():
        return [torch.randn(B, 16, device="cuda", dtype=torch.bfloat16), torch.randn(16, 4, device="cuda"),
                torch.randn(B, 3, 16, device="cuda", dtype=torch.bfloat16)]

    check(*parts(conv_step_in, lambda x, w, s: short_conv_step(x, w, s, backend="triton"), [0, None, 0]), [0, 0])


@pytest.mark.gpu
def test_gpu_token_blocks_past_a_grid_axis():
    """Short conv forward and backward over more than 65,535 token blocks of one sequence (its token blocks were on
    the second axis): against the fp64 reference, and against the same conv run as two calls, the second starting
    from the first's final state, cut on a backward chunk boundary. Before the cut the first call is the same
    kernel on the same chunks as the one call: bitwise equal. Past it the second call (its kernel built with an
    initial state) may round dx differently: the stream backward's fp32 sum of a row's K products depends on which
    product the compiler fuses into an fma, which differs between the kernel's builds and along a chunk's unrolled
    4-row blocks (so a cut off a chunk boundary can change dx past it). So there: within one bf16 rounding, the rows
    not bitwise equal printed."""
    T, C, K = BIG * 128 + 5, 16, 4  # past 65,535 blocks at every autotune config's block height (<= 128 rows)
    x = torch.randn(1, T, C, device=DEV, dtype=torch.bfloat16, requires_grad=True)
    w = torch.randn(C, K, device=DEV, requires_grad=True)
    y, fin = short_conv(x, w, output_final_state=True, backend="triton")
    dy = torch.randn_like(y)
    dx, dw = torch.autograd.grad((y.float() * dy.float()).sum(), (x, w))

    x64, w64 = x.detach().double().requires_grad_(), w.detach().double().requires_grad_()
    y64, fin64 = short_conv_reference(x64, w64, output_final_state=True)
    dx64, dw64 = torch.autograd.grad((y64 * dy.double()).sum(), (x64, w64))
    for name, got, ref in (("y", y, y64), ("dx", dx, dx64)):  # fp32 sums of K terms, rounded to bf16 (one ulp)
        bad = ((got.double() - ref).abs() > 2 ** -7 * ref.abs() + 1e-4).any(-1)[0].nonzero().flatten()
        assert bad.numel() == 0, f"{name}: {bad.numel()} rows off the fp64 reference, first {bad[:8].tolist()}"
    assert torch.equal(fin, fin64.to(fin.dtype))
    torch.testing.assert_close(dw.double(), dw64, rtol=0, atol=1e-5 * dw64.abs().max().item())

    cut = T // 2 // CHUNK * CHUNK
    xa, xb = (x.detach()[:, :cut].clone().requires_grad_(), x.detach()[:, cut:].clone().requires_grad_())
    ya, sa = short_conv(xa, w, output_final_state=True, backend="triton")
    yb, fb = short_conv(xb, w, initial_state=sa, output_final_state=True, backend="triton")

    def same(name, a, b):  # near the cut dx sums two bf16 roundings: within one of the largest there
        lo, hi = cut - K, cut + K
        torch.testing.assert_close(a[:, lo:hi], b[:, lo:hi], rtol=0, atol=2 ** -7 * a[:, lo:hi].abs().max().item())
        assert torch.equal(a[:, :lo], b[:, :lo]), f"{name}: the first call's rows differ from the one call's"
        a, b = a[:, hi:], b[:, hi:]
        rows = (a != b).any(-1)[0].nonzero().flatten().tolist()
        if rows:
            print(f"{name}: {len(rows)} rows past the cut at {cut} not bitwise equal to the one call's "
                  f"(first {[r + hi for r in rows[:4]]})")
        torch.testing.assert_close(a.float(), b.float(), rtol=2 ** -7, atol=1e-5 * a.abs().max().item())

    same("y", y, torch.cat([ya, yb], 1))
    assert torch.equal(fin, fb)
    dxa, dxb, dw2 = torch.autograd.grad((ya.float() * dy[:, :cut].float()).sum()
                                        + (yb.float() * dy[:, cut:].float()).sum(), (xa, xb, w))
    same("dx", dx, torch.cat([dxa, dxb], 1))
    torch.testing.assert_close(dw, dw2, rtol=0, atol=1e-4 * dw.abs().max().item())
