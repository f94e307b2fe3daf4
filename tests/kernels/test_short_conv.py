"""Triton short conv / fused BaseConv core vs the fp64 reference: forward, every gradient (u1, u2, weight,
initial state, through the final state too), k = 2..4, state chaining, varlen resets, decode steps, strided
inputs and torch.compile; the packed op (u = [u1 | u2] + in-projection bias, one du, dbias) against an fp64
formula, with both backward kernels (tile, stream); the BaseConv mixer against its unfused formulation.
CPU runs the kernels under TRITON_INTERPRET=1; bf16 at real sizes is marked gpu."""
import pytest
import torch
import torch.nn.functional as F

from based_kernels.short_conv import (base_conv, base_conv_packed, base_conv_packed_step, base_conv_reference,
                                      base_conv_step, ops, short_conv, short_conv_reference, short_conv_step)

from .poison import assert_equal_where, bad_cu_seqlens, clean_and_poisoned

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
@pytest.mark.parametrize("variant", ["tile", "stream"])
def test_forward_and_gradients_match_fp64(B, T, C, K, has_init, gate, dtype, tol, variant, monkeypatch):
    monkeypatch.setattr(ops, "BWD_VARIANT", variant)
    check_against_fp64(B, T, C, K, has_init, gate, None, dtype, tol)


@pytest.mark.parametrize("K, has_init", [(3, True), (4, False)])
@pytest.mark.parametrize("variant", ["tile", "stream"])
def test_varlen_matches_per_document_fp64(K, has_init, variant, monkeypatch):
    monkeypatch.setattr(ops, "BWD_VARIANT", variant)
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


# ---------------------------------------------------------------- packed op: u = [u1 | u2], bias inside
def packed_formula(u, w, bias, init, cu):
    """fp64 BaseConv core written from the formula: x = u1 + b1, g = u2 + b2, c_t = sum_i w[:, i] x_{t-(k-1)+i}
    within each sequence (document), x before its start from the initial state (else 0), y = SiLU(c) * g.
    Returns (y, final state = the last k - 1 conv inputs of each sequence)."""
    C, K = w.shape
    x, g = u[..., :C], u[..., C:]
    if bias is not None:
        x, g = x + bias[:C], g + bias[C:]
    spans = [(b, 0, u.shape[1]) for b in range(u.shape[0])] if cu is None else \
        [(0, cu[n], cu[n + 1]) for n in range(len(cu) - 1)]
    ys, fins = [], []
    for n, (b, s, e) in enumerate(spans):
        pad = init[n] if init is not None else x.new_zeros(K - 1, C)
        xp = torch.cat([pad, x[b, s:e]])
        c = sum(w[:, i] * xp[i:i + e - s] for i in range(K))
        ys.append(F.silu(c) * g[b, s:e])
        fins.append(xp[xp.shape[0] - (K - 1):])
    y = torch.stack(ys) if cu is None else torch.cat(ys)[None]
    return y, torch.stack(fins)


def check_packed(B, T, C, K, *, has_init=True, has_bias=True, cu=None, dtype=torch.float32, tol=1e-5,
                 layout="contiguous", variant="tile", seed=0):
    """Packed op (Triton, interpreter on CPU) vs the fp64 formula: y, final state and du, dweight, dbias, dinit
    (gradients through y and the final state)."""
    ops.BWD_VARIANT = variant
    N = B if cu is None else len(cu) - 1
    if layout == "megatron":  # [s, b, 2C] in-projection output seen as [b, s, 2C]
        leaf = rand(T, B, 2 * C, dtype=dtype, seed=seed)
        u = leaf.transpose(0, 1)
    else:
        leaf = u = rand(B, T, 2 * C, dtype=dtype, seed=seed)
    w = rand(C, K, seed=seed + 2)
    bias = rand(2 * C, dtype=dtype, seed=seed + 4) if has_bias else None
    init = rand(N, K - 1, C, dtype=dtype, seed=seed + 3) if has_init else None
    cu_t = None if cu is None else torch.tensor(cu, device=DEV)
    inputs = [t for t in (leaf, w, bias, init) if t is not None]
    y, fin = base_conv_packed(u, w, bias, initial_state=init, output_final_state=True, cu_seqlens=cu_t,
                              backend="triton")
    dy, dfin = torch.randn_like(y), torch.randn_like(fin)
    grads = torch.autograd.grad((y * dy).sum() + (fin * dfin).sum(), inputs)

    ref = [t.detach().double().requires_grad_() for t in inputs]
    by_id = {id(a): b for a, b in zip(inputs, ref)}
    r = lambda t: None if t is None else by_id[id(t)]  # noqa: E731
    u_ref = r(leaf).transpose(0, 1) if layout == "megatron" else r(leaf)
    y_ref, fin_ref = packed_formula(u_ref, r(w), r(bias), r(init), cu)
    grads_ref = torch.autograd.grad((y_ref * dy.double()).sum() + (fin_ref * dfin.double()).sum(), ref)
    assert y.dtype == dtype and y.shape == (B, T, C) and fin.shape == (N, K - 1, C)
    errs = [rel(y, y_ref), rel(fin, fin_ref)] + [rel(a, b) for a, b in zip(grads, grads_ref)]
    assert all(e < tol for e in errs), f"relative errors (y, final, du, dw, dbias, dinit) {errs} >= {tol}"


@pytest.fixture
def restore_variant():
    saved = ops.BWD_VARIANT
    yield
    ops.BWD_VARIANT = saved


@pytest.mark.parametrize("variant", ["tile", "stream"])
@pytest.mark.parametrize(
    "B, T, C, K, has_init, has_bias, dtype, tol, layout",
    [
        (2, 37, 40, 3, True, True, torch.float32, 1e-5, "megatron"),  # odd T, C not a block multiple, strided
        (3, 21, 24, 4, False, True, torch.float32, 1e-5, "contiguous"),
        (2, 19, 32, 2, True, False, torch.float32, 1e-5, "megatron"),
        (2, 2, 32, 4, True, True, torch.float32, 1e-5, "contiguous"),  # T < k - 1
        (2, 29, 40, 3, True, True, torch.float16, 3e-3, "megatron"),
    ],
)
def test_packed_matches_fp64_formula(B, T, C, K, has_init, has_bias, dtype, tol, layout, variant, restore_variant):
    check_packed(B, T, C, K, has_init=has_init, has_bias=has_bias, dtype=dtype, tol=tol, layout=layout,
                 variant=variant)


@pytest.mark.parametrize("variant", ["tile", "stream"])
@pytest.mark.parametrize("K, has_init", [(3, True), (4, True), (2, False)])
def test_packed_varlen_resets(K, has_init, variant, restore_variant):
    # documents of length 1 and 2 (< k - 1), one crossing the stream's 32-row chunk boundary, one ending at T
    check_packed(1, 70, 24, K, has_init=has_init, cu=[0, 1, 3, 40, 41, 70], variant=variant, seed=5)


def test_packed_gradient_is_one_tensor_laid_out_like_u(restore_variant):
    s, b, c = 25, 3, 16
    u = rand(s, b, 2 * c, seed=50).detach().transpose(0, 1)
    w, bias = rand(c, 3, seed=51).detach(), rand(2 * c, seed=52).detach()
    dy = rand(b, s, c, seed=53).detach()
    for variant in ("tile", "stream"):
        ops.BWD_VARIANT = variant
        y = ops.packed_fwd(u, w, bias, None, None)
        du, dw, dbias, _ = ops.packed_bwd(dy, u, w, bias, None, None)
        assert y.transpose(0, 1).is_contiguous() and du.shape == u.shape and du.transpose(0, 1).is_contiguous()
        assert dbias.shape == (2 * c,) and rel(dbias, du.double().sum((0, 1))) < 1e-6  # dbias = sum of du over tokens


def test_packed_chunked_state_and_decode_equal_full_forward():
    B, T, C, P = 2, 13, 24, 6
    u, w, bias = rand(B, T, 2 * C, seed=60).detach(), rand(C, 3, seed=61).detach(), rand(2 * C, seed=62).detach()
    y_full, fin_full = base_conv_packed(u, w, bias, output_final_state=True, backend="triton")
    y1, s1 = base_conv_packed(u[:, :P], w, bias, output_final_state=True, backend="triton")
    y2, s2 = base_conv_packed(u[:, P:], w, bias, initial_state=s1, output_final_state=True, backend="triton")
    assert rel(torch.cat([y1, y2], 1), y_full) < 1e-6 and rel(s2, fin_full) < 1e-7
    assert rel(s1, u[:, P - 2:P, :C] + bias[:C]) < 1e-7  # the state holds the conv inputs u1 + b1
    ys, state = [y1], s1
    for t in range(P, T):
        y_t, state = base_conv_packed_step(u[:, t], w, state, bias, backend="triton")
        ys.append(y_t[:, None])
    assert rel(torch.cat(ys, 1), y_full) < 1e-6 and rel(state, fin_full) < 1e-7
    y_ref, st_ref = base_conv_packed_step(u[:, P], w, s1, bias, backend="torch")
    assert rel(ys[1][:, 0], y_ref) < 1e-6 and rel(st_ref, base_conv_packed_step(u[:, P], w, s1, bias)[1]) < 1e-7


def _step_call(kind, x, w, state, bias, backend, inplace):
    """One decode step of ``kind``: "plain" (short_conv_step), "gate" (base_conv_step), "packed" (with bias or
    None); x is ``[B, 2C]`` (u1 | u2, the packed input)."""
    C = x.shape[1] // 2
    if kind == "plain":
        return short_conv_step(x[:, :C], w, state, backend=backend, inplace=inplace)
    if kind == "gate":
        return base_conv_step(x[:, :C], x[:, C:], w, state, backend=backend, inplace=inplace)
    return base_conv_packed_step(x, w, state, bias, backend=backend, inplace=inplace)


@pytest.mark.parametrize("backend", ["triton", "torch"])
@pytest.mark.parametrize("K", [2, 3, 4])
@pytest.mark.parametrize("kind, has_bias", [("plain", False), ("gate", False), ("packed", False), ("packed", True)])
@pytest.mark.parametrize("dtype, st_dtype", [(torch.float32, torch.float32), (torch.bfloat16, torch.bfloat16),
                                             (torch.bfloat16, torch.float32)])
def test_step_inplace_equals_out_of_place(backend, K, kind, has_bias, dtype, st_dtype):
    """Decode steps writing the new state over the old one (``inplace=True``) give bitwise the out-of-place
    outputs and states, over several steps; the state may be a strided view (last dim contiguous) whose padding
    stays untouched; the out-of-place step leaves its input state as it was."""
    check_step_inplace(backend, K, kind, has_bias, dtype, st_dtype, B=3, C=300)  # C > BC = 256: a masked block


@pytest.mark.gpu
@pytest.mark.parametrize("kind, has_bias", [("gate", False), ("packed", True)])
@pytest.mark.parametrize("dtype, st_dtype", [(torch.bfloat16, torch.bfloat16), (torch.bfloat16, torch.float32)])
def test_gpu_step_inplace_equals_out_of_place_real_sizes(kind, has_bias, dtype, st_dtype):
    """The same on the GPU at based-1.3b's decode size (batch 128, 3584 channels, k 3): compiled, many channel
    blocks and batch rows per launch, so a store landing before another lane's load would show."""
    check_step_inplace("triton", 3, kind, has_bias, dtype, st_dtype, B=128, C=3584, steps=6)


def check_step_inplace(backend, K, kind, has_bias, dtype, st_dtype, B, C, steps=4):
    xs = [rand(B, 2 * C, dtype=dtype, seed=80 + t).detach() for t in range(steps)]
    w = rand(C, K, seed=90).detach()
    bias = rand(2 * C, dtype=dtype, seed=91).detach() if has_bias else None
    buf = rand(B, K - 1, C + 7, dtype=st_dtype, seed=92).detach()
    pad = buf[..., C:].clone()
    state = buf[..., :C]  # lastdim contiguous, row strides of C + 7
    ref_state = state.clone()
    for t in range(steps):
        prev, before = ref_state, ref_state.clone()
        y_ref, ref_state = _step_call(kind, xs[t], w, prev, bias, backend, False)
        assert torch.equal(prev, before)  # out of place: the input state is left as it was
        y, st = _step_call(kind, xs[t], w, state, bias, backend, True)
        assert st is state and st.dtype == st_dtype
        assert y.dtype == dtype and torch.equal(y, y_ref), (t, (y - y_ref).abs().max())
        assert torch.equal(state, ref_state.to(st_dtype)), t
    assert torch.equal(buf[..., C:], pad)
    if not has_bias:  # the newest state row is the last input
        assert torch.equal(state[:, -1], xs[-1][:, :C].to(st_dtype))


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_step_inplace_errors(backend):
    B, C, K = 2, 16, 3
    x, w = rand(B, 2 * C, seed=95).detach(), rand(C, K, seed=96).detach()
    good = torch.zeros(B, K - 1, C, device=DEV)
    bad = {
        "needs a state": None,
        "dtype the step computes": good.to(torch.bfloat16),  # fp32 input: the new state is fp32
        r"\[B, k-1, C\]": torch.zeros(B, K, C, device=DEV),
        "contiguous last dim": torch.zeros(B, C, K - 1, device=DEV).transpose(1, 2),
        "do not overlap": torch.zeros(1, K - 1, C, device=DEV).expand(B, -1, -1),
    }
    for message, state in bad.items():
        for kind in ("plain", "gate", "packed"):
            with pytest.raises(ValueError, match=message):
                _step_call(kind, x, w, state, None, backend, True)
    y, st = _step_call("packed", x, w, good, None, backend, True)  # the good state passes
    assert st is good and good[:, -1].equal(x[:, :C])


def test_packed_torch_compile_traces_the_custom_op():
    u, w, bias = rand(2, 20, 64, seed=70), rand(32, 3, seed=71), rand(64, seed=72)
    f = torch.compile(lambda u, w, b: base_conv_packed(u, w, b, backend="triton")[0], backend="aot_eager",
                      fullgraph=True)
    y = f(u, w, bias)
    g = torch.autograd.grad(y.square().sum(), [u, w, bias])
    y_e = base_conv_packed(u, w, bias, backend="triton")[0]
    g_e = torch.autograd.grad(y_e.square().sum(), [u, w, bias])
    assert rel(y, y_e) < 1e-7 and all(rel(a, b) < 1e-7 for a, b in zip(g, g_e))


def test_packed_errors():
    u, w = rand(1, 8, 32).detach(), rand(16, 3).detach()
    with pytest.raises(ValueError, match="bias must be"):
        base_conv_packed(u, w, torch.zeros(16, device=DEV), backend="triton")
    with pytest.raises(ValueError, match="packed u"):
        base_conv_packed(rand(1, 8, 31).detach(), w, backend="triton")
    with pytest.raises(ValueError, match="weight must be"):
        base_conv_packed(u, rand(32, 3).detach(), backend="triton")
    with pytest.raises(ValueError, match="initial_state must be"):
        base_conv_packed(u, w, initial_state=torch.zeros(2, 2, 16, device=DEV), backend="triton")


def _mixer_vs_unfused(rank, world):
    """BaseConv mixer (packed op, bias inside the kernel) == the unfused formulation (linear_in with its bias ->
    chunk -> base_conv), outputs and every parameter gradient; Triton kernels (interpreter on CPU)."""
    import based_kernels
    from megatron_based.model.mixers.base import to_bshd

    from ..megatron_based.helpers import initialize_parallel, tiny_model

    initialize_parallel(1, 1, 1)
    model = tiny_model("C")
    mix = model.decoder.layers[0].self_attention
    with torch.no_grad():
        mix.linear_in.bias.normal_()  # zero at init: make the fused bias path matter
    x = torch.randn(11, 2, 32, requires_grad=True)
    out = {}
    with based_kernels.use_backend("triton"):
        for name in ("fused", "unfused"):
            mix.zero_grad()
            if name == "fused":
                y, b_out = mix(x)
            else:
                u = F.linear(x, mix.linear_in.weight, mix.linear_in.bias)
                u1, u2 = u.chunk(2, dim=-1)
                c, _ = based_kernels.base_conv(to_bshd(u1), to_bshd(u2), mix.conv_weight)
                y, b_out = mix.linear_out(to_bshd(c))
            y = y + b_out
            dy = torch.randn(y.shape, generator=torch.Generator().manual_seed(3))
            (y * dy).sum().backward(inputs=[x] + list(mix.parameters()))
            out[name] = [y.detach()] + [p.grad.clone() for p in [x] + list(mix.parameters())]
            x.grad = None
    names = ["y", "x"] + [n for n, _ in mix.named_parameters()]
    return {n: rel(a, b) for n, a, b in zip(names, out["fused"], out["unfused"])}


@bad_cu_seqlens
@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_bad_cu_seqlens_are_refused(bounds, message, backend):
    u, w = rand(1, 40, 32).detach(), rand(16, 3).detach()
    for cu in (torch.tensor(bounds, device=DEV), torch.tensor(bounds, device=DEV, dtype=torch.int32)):
        with pytest.raises(ValueError, match=message):
            base_conv_packed(u, w, cu_seqlens=cu, backend=backend)
        with pytest.raises(ValueError, match=message):
            short_conv(u[..., :16], w, cu_seqlens=cu, backend=backend)
    with pytest.raises(ValueError, match=r"cu_seqlens must be a 1-D integer tensor"):
        base_conv_packed(u, w, cu_seqlens=torch.tensor([0., 40.], device=DEV), backend=backend)


def check_nan_confined(which, varlen, variant, T, split, C, K, dtype):
    """NaN in the conv input u1 or the gate u2 of the last token t of one sequence (batch row 0 of 2, or the first
    of two documents ending at ``split``) of the packed op: y_t is NaN; earlier outputs, du1 of tokens before
    t - (K-1) (dx_j sums dc_j .. dc_{j+K-1}), du2 of tokens before t (all of them for a NaN gate) and everything of
    the other sequence equal the clean run's bit for bit."""
    ops.BWD_VARIANT = variant
    u, w, bias = rand(1 if varlen else 2, T, 2 * C, dtype=dtype), rand(C, K, seed=1), rand(2 * C, seed=2)
    cu = torch.tensor([0, split, T], dtype=torch.int32, device=DEV) if varlen else None
    end = split if varlen else T
    halves = {"u1": slice(0, C), "u2": slice(C, None)}
    fn = lambda u, w, b: base_conv_packed(u, w, b, cu_seqlens=cu, backend="triton")[0]  # noqa: E731
    (y, (du, _, _)), (y_, (du_, _, _)) = clean_and_poisoned(fn, (u, w, bias), 0, (0, end - 1, halves[which]))
    other = (0, slice(end, None)) if varlen else (1,)
    assert y_[0, end - 1].isnan().all()
    assert_equal_where(y, y_, "y", (0, slice(0, end - 1)), other)
    assert_equal_where(du, du_, "du", (0, slice(0, end - K), halves["u1"]), other,
                       (0, slice(0, end if which == "u2" else end - 1), halves["u2"]))


@pytest.mark.parametrize("variant", ["tile", "stream"])
@pytest.mark.parametrize("which", ["u1", "u2"])
@pytest.mark.parametrize("varlen", [False, True])
def test_nan_reaches_only_the_outputs_that_see_it(which, varlen, variant, restore_variant):
    check_nan_confined(which, varlen, variant, 70, 40, 16, 3, torch.float32)


@pytest.mark.skipif(DEV != "cpu", reason="forks gloo workers: CPU only")
def test_mixer_equals_unfused_formulation():
    from ..distributed import run_distributed

    errs = run_distributed(_mixer_vs_unfused, 1)[0]
    assert len(errs) == 7 and all(e < 1e-5 for e in errs.values()), errs


# ---------------------------------------------------------------- GPU, bf16, real sizes
@pytest.mark.gpu
@pytest.mark.parametrize("K, varlen", [(3, False), (2, True)])  # every K runs on CPU too; K=4 below (packed)
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


@pytest.mark.gpu
@pytest.mark.parametrize("K, varlen, variant", [(3, False, "tile"), (2, True, "tile"), (4, False, "stream"),
                                               (3, True, "stream")])  # each variant plain and varlen
def test_gpu_packed_bf16_real_sizes(K, varlen, variant, restore_variant):
    if varlen:
        check_packed(1, 8192, 1024, K, cu=[0, 3, 1000, 1001, 5000, 8192], dtype=torch.bfloat16, tol=1e-2,
                     layout="contiguous", variant=variant, seed=K)
    else:
        check_packed(4, 2048, 2048, K, dtype=torch.bfloat16, tol=1e-2, layout="megatron", variant=variant, seed=K)


@pytest.mark.gpu
@pytest.mark.parametrize("variant", ["tile", "stream"])
def test_gpu_packed_gradients_are_deterministic(variant, restore_variant):
    ops.BWD_VARIANT = variant
    u = rand(4096, 8, 2048, dtype=torch.bfloat16).transpose(0, 1)
    w, bias = rand(1024, 3), rand(2048, dtype=torch.bfloat16, seed=1)
    y, _ = base_conv_packed(u, w, bias)
    dy = torch.randn_like(y)
    first = torch.autograd.grad(y, [u, w, bias], dy)
    for _ in range(3):
        y2, _ = base_conv_packed(u, w, bias)
        again = torch.autograd.grad(y2, [u, w, bias], dy)
        assert torch.equal(y, y2) and all(torch.equal(a, b) for a, b in zip(first, again))


@pytest.mark.gpu
@pytest.mark.parametrize("which", ["u1", "u2"])
@pytest.mark.parametrize("varlen, variant", [(False, "tile"), (True, "stream")])  # each compilation costs ~10 s
def test_gpu_nan_reaches_only_the_outputs_that_see_it_bf16(which, varlen, variant, restore_variant):
    check_nan_confined(which, varlen, variant, 600, 350, 256, 4, torch.bfloat16)
