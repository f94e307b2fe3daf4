"""Triton sliding-window attention vs the fp64 reference: forward, every gradient, window edges, GQA, padded
head dims, kv_prefix, varlen, strided inputs and torch.compile. On CPU the kernels run under TRITON_INTERPRET=1
(fp32/fp16 only: bf16 tl.dot is wrong in the interpreter); the bf16 cases at real sizes are marked gpu."""
import pytest
import torch

from based_kernels import _common, sliding_window_attention
from based_kernels.sliding_window import sliding_window_attention_reference as reference
from based_kernels.sliding_window import ops, sliding_window_step

from .poison import assert_equal_where, bad_cu_seqlens, clean_and_poisoned

DEV = "cuda" if torch.cuda.is_available() else "cpu"


def rel(a, b):
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm()).item()


def make(B, T, H, Hkv, D, dtype, P=0, seed=0):
    g = torch.Generator(device="cpu").manual_seed(seed)
    t = lambda *s: torch.randn(*s, generator=g).to(DEV, dtype).requires_grad_()  # noqa: E731
    q, k, v = t(B, T, H, D), t(B, T, Hkv, D), t(B, T, Hkv, D)
    prefix = (t(B, P, Hkv, D), t(B, P, Hkv, D)) if P else None
    return q, k, v, prefix


def check_against_fp64(q, k, v, prefix, window, tol, cu_seqlens=None):
    inputs = [q, k, v] + (list(prefix) if prefix else [])
    o = sliding_window_attention(q, k, v, window=window, kv_prefix=prefix, cu_seqlens=cu_seqlens,
                                 backend="triton")
    do = torch.randn_like(o)
    grads = torch.autograd.grad(o, inputs, do)
    ref_in = [x.detach().double().requires_grad_() for x in inputs]
    o_ref = reference(*ref_in[:3], window=window, kv_prefix=tuple(ref_in[3:]) or None, cu_seqlens=cu_seqlens)
    grads_ref = torch.autograd.grad(o_ref, ref_in, do.double())
    assert o.dtype == q.dtype and o.shape == q.shape
    errs = [rel(o, o_ref)] + [rel(a, b) for a, b in zip(grads, grads_ref)]
    assert all(e < tol for e in errs), f"relative errors (o, dq, dk, dv, dk_prefix, dv_prefix) {errs} >= {tol}"


@pytest.mark.parametrize(
    "B, T, H, Hkv, D, W, P, dtype, tol",
    [
        (2, 50, 2, 1, 16, 7, 0, torch.float32, 1e-5),  # GQA, T not a block multiple, W not a power of two
        (1, 70, 2, 2, 24, 20, 5, torch.float32, 1e-5),  # head dim padded 24 -> 32, kv_prefix shorter than W
        (1, 40, 2, 1, 16, 100, 0, torch.float16, 3e-3),  # T < W: plain causal attention
        (1, 33, 1, 1, 112, 16, 40, torch.float32, 1e-5),  # the 1.3B head dim (112 padded to 128), P > W
    ],
)
@pytest.mark.parametrize("confine", [False, True], ids=["plain", "confining"])
def test_forward_and_gradients_match_fp64(B, T, H, Hkv, D, W, P, dtype, tol, confine, monkeypatch):
    """Clean inputs take the plain launches (the confining ones return at once); ``confining``: the confining
    launches recompute every tile (_common.ALWAYS_CONFINE), the path of inputs with a NaN or inf."""
    monkeypatch.setattr(_common, "ALWAYS_CONFINE", confine)
    check_against_fp64(*make(B, T, H, Hkv, D, dtype, P), W, tol)


def check_confining_equals_plain(B, T, H, Hkv, D, W, P, dtype, cu=None):
    """On clean inputs the confining launches give the plain ones' outputs and gradients bit for bit (what lets
    a NaN leave everything it cannot reach bitwise equal to a clean run, check_nan_confined)."""
    q, k, v, prefix = make(B, T, H, Hkv, D, dtype, P, seed=9)
    inputs = [q, k, v] + (list(prefix) if prefix else [])
    runs = []
    for confine in (False, True):
        _common.ALWAYS_CONFINE = confine
        try:
            o = sliding_window_attention(q, k, v, window=W, kv_prefix=prefix, cu_seqlens=cu, backend="triton")
            runs.append([o, *torch.autograd.grad(o, inputs, torch.ones_like(o))])
        finally:
            _common.ALWAYS_CONFINE = False
    for name, a, b in zip(["o", "dq", "dk", "dv", "dk_prefix", "dv_prefix"], *runs):
        assert torch.equal(a, b), (name, (a.double() - b.double()).abs().max().item())


def test_confining_launches_equal_plain_ones():
    check_confining_equals_plain(2, 50, 4, 2, 16, 7, 9, torch.float32)
    check_confining_equals_plain(1, 45, 2, 1, 16, 10, 0, torch.float32, cu=torch.tensor([0, 7, 30, 45], device=DEV))


def test_varlen_matches_per_document_fp64():
    q, k, v, _ = make(1, 64, 4, 2, 32, torch.float32, seed=1)
    cu = torch.tensor([0, 13, 14, 40, 64], device=DEV, dtype=torch.int32)  # includes a 1-token document
    check_against_fp64(q, k, v, None, 9, 1e-5, cu_seqlens=cu)


def test_window_edge_gradient_support():
    """d o_t / d k_j is nonzero exactly for t - W <= j <= t (t - W kept, t - W - 1 masked), and likewise d v_j."""
    W, T, t = 11, 40, 30
    q, k, v, _ = make(1, T, 1, 1, 16, torch.float32, seed=2)
    o = sliding_window_attention(q, k, v, window=W, backend="triton")
    dq, dk, dv = torch.autograd.grad(o[0, t].sum(), [q, k, v])
    support_k = (dk[0, :, 0].abs().sum(-1) > 0).nonzero().flatten().tolist()
    support_v = (dv[0, :, 0].abs().sum(-1) > 0).nonzero().flatten().tolist()
    assert support_k == support_v == list(range(t - W, t + 1))
    assert (dq[0, :t].abs().sum() == 0) and (dq[0, t + 1:].abs().sum() == 0) and dq[0, t].abs().sum() > 0


def test_kv_prefix_equals_attention_over_concatenation():
    """Prefix rows at positions -P..-1 == the same rows at the start of a longer sequence (halo semantics)."""
    P, T, W = 12, 30, 16
    q_pre, k_pre, v_pre, _ = make(1, P, 2, 2, 16, torch.float32, seed=3)
    q, k, v, _ = make(1, T, 2, 2, 16, torch.float32, seed=4)
    o = sliding_window_attention(q, k, v, window=W, kv_prefix=(k_pre, v_pre), backend="triton")
    o_cat = sliding_window_attention(torch.cat([q_pre, q], 1), torch.cat([k_pre, k], 1), torch.cat([v_pre, v], 1),
                                     window=W, backend="triton")[:, P:]
    assert rel(o, o_cat) < 1e-6
    do = torch.randn_like(o)
    g = torch.autograd.grad(o, [k_pre, v_pre, k], do)
    g_cat = torch.autograd.grad(o_cat, [k_pre, v_pre, k], do)
    assert all(rel(a, b) < 1e-6 for a, b in zip(g, g_cat))


def test_megatron_strided_layout_and_token_major_output():
    """[s, b, 3, h, d] views go in without a copy and give the same numbers; the output stays token-major."""
    s, b, h, d = 40, 2, 4, 16
    qkv = torch.randn(s, b, 3, h, d, device=DEV)
    q, k, v = (qkv[:, :, i].transpose(0, 1) for i in range(3))
    o = sliding_window_attention(q, k, v, window=6, backend="triton")
    o_ref = reference(*(t.contiguous().double() for t in (q, k, v)), window=6)
    assert rel(o, o_ref) < 1e-5
    assert o.stride(0) < o.stride(1)  # [b, s, h, d] view of an [s, b, h, d] buffer
    assert o.transpose(0, 1).is_contiguous()


def test_torch_compile_traces_the_custom_op():
    q, k, v, _ = make(1, 24, 2, 1, 16, torch.float32, seed=5)
    f = torch.compile(lambda q, k, v: sliding_window_attention(q, k, v, window=5, backend="triton"),
                      backend="aot_eager", fullgraph=True)
    o = f(q, k, v)
    dq, = torch.autograd.grad(o.square().sum(), [q])
    o_e = sliding_window_attention(q, k, v, window=5, backend="triton")
    dq_e, = torch.autograd.grad(o_e.square().sum(), [q])
    assert rel(o, o_e) < 1e-7 and rel(dq, dq_e) < 1e-7


def test_backend_dispatch_and_errors():
    q, k, v, _ = make(1, 8, 2, 1, 16, torch.float32)
    if DEV == "cpu":  # default backend on CPU tensors is the PyTorch reference
        assert torch.equal(sliding_window_attention(q, k, v, window=3), reference(q, k, v, window=3))
    with pytest.raises(ValueError, match="backend"):
        sliding_window_attention(q, k, v, window=3, backend="cuda")
    with pytest.raises(ValueError, match="multiple of key/value heads"):
        sliding_window_attention(q, k.repeat(1, 1, 3, 1), v.repeat(1, 1, 3, 1), window=3, backend="triton")
    with pytest.raises(ValueError, match="window must be >= 0"):
        sliding_window_attention(q, k, v, window=-1, backend="triton")


def test_plain_fast_path_equals_general_path():
    """Plain calls (no prefix, no documents) take the cached-plan path (``ops._PlainFunction``); it gives
    bitwise the general path's outputs, gradients and layouts: batch-major and Megatron token-major GQA inputs,
    a dO with a strided last dim, twice (the second call reuses the plan)."""
    q0, k0, v0, _ = make(2, 45, 4, 2, 16, torch.float32, seed=3)
    tm = lambda t: t.detach().transpose(0, 1).contiguous().transpose(0, 1).requires_grad_()  # noqa: E731
    for q, k, v in [(q0, k0, v0), (tm(q0), tm(k0), tm(v0))]:
        do = torch.randn(2, 45, 4, 32, device=DEV)[..., ::2]
        for _ in range(2):
            o = sliding_window_attention(q, k, v, window=9, backend="triton")
            assert type(o.grad_fn).__name__ == "_PlainFunctionBackward"
            grads = torch.autograd.grad(o, [q, k, v], do)
            o_g = ops.SlidingWindowAttentionFunction.apply(q, k, v, None, None, None, 9, 16 ** -0.5)
            grads_g = torch.autograd.grad(o_g, [q, k, v], do)
            for a, b in zip([o, *grads], [o_g, *grads_g]):
                assert torch.equal(a, b) and a.stride() == b.stride()
    assert rel(o, reference(q.double(), k.double(), v.double(), window=9)) < 1e-5


def test_fp32_products_follow_the_float32_matmul_setting(monkeypatch):
    """fp32 inputs: every launch (forward, both backward kernels; the cached-plan path and the general one) takes
    its products' precision from torch's float32 matmul setting at call time (IEEE at "highest", torch's default,
    and "high"; tf32 at "medium"), a changed setting gets its own plan; bf16 keeps tf32."""
    seen = []

    def spy(launcher):
        def launch(grid, args, **consts):
            seen.append(consts["DOT_PREC"])
            return launcher(grid, args, **consts)
        return launch

    for name in ("_fwd", "_bwd_dq", "_bwd_dkdv"):  # each launched twice: plain, then confining (_common)
        monkeypatch.setattr(ops, name, spy(getattr(ops, name)))
    old = torch.get_float32_matmul_precision()
    try:
        for setting, want in (("highest", "ieee"), ("medium", "tf32"), ("high", "ieee")):
            torch.set_float32_matmul_precision(setting)
            for cu in (None, torch.tensor([0, 20, 33], device=DEV)):  # plan path, general path
                q, k, v, _ = make(1, 33, 2, 1, 16, torch.float32, seed=5)
                seen.clear()
                o = sliding_window_attention(q, k, v, window=7, cu_seqlens=cu, backend="triton")
                torch.autograd.grad(o, [q, k, v], torch.ones_like(o))
                assert seen == [want] * 6, (setting, cu, seen)
        seen.clear()
        q, k, v, _ = make(1, 33, 2, 1, 16, torch.bfloat16, seed=5)
        sliding_window_attention(q, k, v, window=7, backend="triton")
        assert seen == ["tf32"] * 2
    finally:
        torch.set_float32_matmul_precision(old)


def test_cached_validation_still_checks_new_shapes():
    """A validated signature is cached (plan); any change of shapes, window or layout is validated again."""
    q, k, v, _ = make(2, 8, 2, 1, 16, torch.float32)
    sliding_window_attention(q, k, v, window=3, backend="triton")
    sliding_window_attention(q, k, v, window=3, backend="triton")  # cached
    with pytest.raises(ValueError, match="window must be >= 0"):
        sliding_window_attention(q, k, v, window=-1, backend="triton")
    with pytest.raises(ValueError, match="expected q"):
        sliding_window_attention(q, k[:, :7], v[:, :7], window=3, backend="triton")
    with pytest.raises(ValueError, match="expected q"):
        sliding_window_attention(q, k, v[..., :8], window=3, backend="triton")
    with pytest.raises(ValueError, match="multiple of key/value heads"):
        sliding_window_attention(q[:, :, :1].expand(2, 8, 3, 16), k.expand(2, 8, 2, 16), v.expand(2, 8, 2, 16),
                                 window=3, backend="triton")
    with pytest.raises(ValueError, match="head dim"):
        big = torch.zeros(2, 8, 2, 272, device=DEV)
        sliding_window_attention(big, big[:, :, :1], big[:, :, :1], window=3, backend="triton")
    # a last dim that is not contiguous: validated, then the general path (which copies it)
    qs = torch.randn(2, 8, 2, 32, device=DEV)[..., ::2]
    o = sliding_window_attention(qs, k, v, window=3, backend="triton")
    assert type(o.grad_fn).__name__ == "SlidingWindowAttentionFunctionBackward"
    assert torch.equal(o, sliding_window_attention(qs.contiguous(), k, v, window=3, backend="triton"))


@bad_cu_seqlens
@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_bad_cu_seqlens_are_refused(bounds, message, backend):
    q, k, v, _ = make(1, 40, 2, 1, 16, torch.float32)
    with pytest.raises(ValueError, match=message):
        sliding_window_attention(q, k, v, window=4, cu_seqlens=torch.tensor(bounds, device=DEV), backend=backend)
    with pytest.raises(ValueError, match=r"cu_seqlens must be a 1-D integer tensor"):
        sliding_window_attention(q, k, v, window=4, cu_seqlens=torch.tensor([0., 40.], device=DEV), backend=backend)


def check_nan_confined(which, varlen, T, split, W, D, dtype, H=4, Hkv=2):
    """NaN in k, v or the output gradient ("do") of the last token t of one sequence (batch row 0 of 2, or the
    first of two documents ending at ``split``): o_t is NaN; earlier outputs and their dq, dk and dv of keys before
    t - W (no query that sees t sees them), all of dv for a NaN v (dv does not depend on v), and everything of the
    other sequence equal the clean run's bit for bit."""
    q, k, v, _ = make(1 if varlen else 2, T, H, Hkv, D, dtype)
    m = torch.ones(q.shape, device=DEV, dtype=dtype)  # o * m: a NaN in m is a NaN in dO (and in o)
    cu = torch.tensor([0, split, T], dtype=torch.int32, device=DEV) if varlen else None
    end = split if varlen else T
    row, before, far = (0, end - 1), (0, slice(0, end - 1)), (0, slice(0, end - 1 - W))
    other = (0, slice(end, None)) if varlen else (1,)
    fn = lambda q, k, v, m: m * sliding_window_attention(q, k, v, window=W, cu_seqlens=cu, backend="triton")  # noqa
    (o, (dq, dk, dv, _)), (o_, (dq_, dk_, dv_, _)) = clean_and_poisoned(fn, (q, k, v, m),
                                                                          ["q", "k", "v", "do"].index(which), row)
    assert o_[row].isnan().all() and dq_[row].isnan().any()
    assert_equal_where(o, o_, "o", before, other)
    assert_equal_where(dq, dq_, "dq", before, other)
    assert_equal_where(dk, dk_, "dk", far, other)
    assert_equal_where(dv, dv_, "dv", (0, slice(0, end)) if which == "v" else far, other)


@pytest.mark.parametrize("which", ["k", "v", "do"])
@pytest.mark.parametrize("varlen", [False, True])
def test_nan_reaches_only_the_outputs_that_see_it(which, varlen):
    # GQA with 2 query heads per key/value head (the NaN is in every head of its token: more heads check nothing more)
    check_nan_confined(which, varlen, 70, 40, 8, 16, torch.float32, H=2, Hkv=1)


# ---------------------------------------------------------------- GPU, bf16, real sizes
@pytest.mark.gpu
@pytest.mark.parametrize("D, Hkv, P, varlen", [(64, 16, 0, False), (64, 4, 128, False), (112, 16, 0, True),
                                               (128, 4, 128, False)])  # each head dim, GQA + prefix and varlen
def test_gpu_bf16_real_sizes(D, Hkv, P, varlen):
    check_bf16_real_sizes(D, Hkv, P, varlen)


def check_bf16_real_sizes(D, Hkv, P, varlen):
    B, T, H, W = (1, 4096, 16, 128) if varlen else (2, 2048, 16, 128)
    q, k, v, prefix = make(B, T, H, Hkv, D, torch.bfloat16, P, seed=D)
    cu = torch.tensor([0, 1000, 1001, 3000, 4096], device=DEV, dtype=torch.int32) if varlen else None
    inputs = [q, k, v] + (list(prefix) if prefix else [])
    o = sliding_window_attention(q, k, v, window=W, kv_prefix=prefix, cu_seqlens=cu)
    do = torch.randn_like(o)
    grads = torch.autograd.grad(o, inputs, do)
    ref_in = [x.detach().double().requires_grad_() for x in inputs]
    o_ref = reference(*ref_in[:3], window=W, kv_prefix=tuple(ref_in[3:]) or None, cu_seqlens=cu)
    grads_ref = torch.autograd.grad(o_ref, ref_in, do.double())
    errs = [rel(o, o_ref)] + [rel(a, b) for a, b in zip(grads, grads_ref)]
    assert all(e < 1.5e-2 for e in errs), errs
    # deterministic: bitwise equal on a second run (which launches through the cached-kernel fast path)
    o2 = sliding_window_attention(q, k, v, window=W, kv_prefix=prefix, cu_seqlens=cu)
    grads2 = torch.autograd.grad(o2, inputs, do)
    assert torch.equal(o, o2) and all(torch.equal(a, b) for a, b in zip(grads, grads2))


@pytest.mark.gpu
@pytest.mark.parametrize("which", ["k", "v", "do"])
@pytest.mark.parametrize("varlen", [False, True])
def test_gpu_nan_reaches_only_the_outputs_that_see_it_bf16(which, varlen):
    check_nan_confined(which, varlen, 600, 350, 128, 64, torch.bfloat16)


@pytest.mark.gpu
@pytest.mark.parametrize("D", [64, 128])
def test_gpu_confining_launches_equal_plain_ones_bf16(D):
    check_confining_equals_plain(2, 1000, 8, 4, D, 128, 128, torch.bfloat16)


# ---------------------------------------------------------------- the fused backward (ops.BWD = "fused")
FUSED_CASES = [  # the cases of test_forward_and_gradients_match_fp64; strips of one and two 16-row blocks (the
    # interpreter's block): most query blocks take their first key blocks from the strip before
    (2, 50, 2, 1, 16, 7, 0, torch.float32, 1e-5, 16),
    (1, 70, 2, 2, 24, 20, 5, torch.float32, 1e-5, 32),
    (1, 40, 2, 1, 16, 100, 0, torch.float16, 3e-3, 16),
    (1, 33, 1, 1, 112, 16, 40, torch.float32, 1e-5, 1024),
]


def nan_scratch(n, device):  # a read of a dQ slot before its first write makes that dQ NaN
    return torch.full((n,), float("nan"), dtype=torch.float32, device=device)


@pytest.mark.parametrize("B, T, H, Hkv, D, W, P, dtype, tol, strip", FUSED_CASES)
@pytest.mark.parametrize("confine", [False, True], ids=["plain", "confining"])
def test_fused_backward_matches_fp64(B, T, H, Hkv, D, W, P, dtype, tol, strip, confine, monkeypatch):
    """GQA, padded head dims, kv_prefix (P < W, P > W), T < W; ``confining``: the fused kernel's confining launch
    recomputes the gradients. The scratch starts as NaN."""
    monkeypatch.setattr(ops, "_scratch", nan_scratch)
    monkeypatch.setattr(ops, "BWD", "fused")
    monkeypatch.setattr(ops, "STRIP", strip)
    monkeypatch.setattr(_common, "ALWAYS_CONFINE", confine)
    check_against_fp64(*make(B, T, H, Hkv, D, dtype, P), W, tol)


@pytest.mark.parametrize("which", ["k", "v", "do"])
def test_fused_backward_varlen_and_nan_confinement(which, monkeypatch):
    monkeypatch.setattr(ops, "BWD", "fused")
    monkeypatch.setattr(ops, "STRIP", 32)
    if which == "k":
        q, k, v, _ = make(1, 64, 4, 2, 32, torch.float32, seed=1)
        cu = torch.tensor([0, 13, 14, 40, 64], device=DEV, dtype=torch.int32)
        check_against_fp64(q, k, v, None, 9, 1e-5, cu_seqlens=cu)
        check_confining_equals_plain(2, 50, 4, 2, 16, 7, 9, torch.float32)
    check_nan_confined(which, which == "do", 70, 40, 8, 16, torch.float32, H=2, Hkv=1)


def fused_grads(q, k, v, prefix, W, do, cu=None):
    inputs = [q, k, v] + (list(prefix) if prefix else [])
    o = sliding_window_attention(q, k, v, window=W, kv_prefix=prefix, cu_seqlens=cu, backend="triton")
    return torch.autograd.grad(o, inputs, do)


@pytest.mark.parametrize("P", [0, 21])
def test_fused_backward_does_not_depend_on_the_strip(P, monkeypatch):
    """Each dQ row sums its key blocks in one order whatever the strips: bitwise equal gradients at strips of 1, 3
    and 64 blocks; and within fp32 rounding of the two-kernel backward's."""
    q, k, v, prefix = make(2, 90, 2, 1, 16, torch.float32, P, seed=3)
    do = torch.randn(2, 90, 2, 16, device=DEV)
    monkeypatch.setattr(ops, "_scratch", nan_scratch)
    monkeypatch.setattr(ops, "BWD", "fused")
    runs = []
    for strip in (16, 48, 1024):
        monkeypatch.setattr(ops, "STRIP", strip)
        runs.append(fused_grads(q, k, v, prefix, 20, do))
    assert all(torch.equal(a, b) for run in runs[1:] for a, b in zip(runs[0], run))
    monkeypatch.setattr(ops, "BWD", "split")
    split = fused_grads(q, k, v, prefix, 20, do)
    assert all(rel(a, b) < 1e-6 for a, b in zip(runs[0], split)), [rel(a, b) for a, b in zip(runs[0], split)]


def test_bad_backward_choice_is_refused_by_name():
    import os
    import pathlib
    import subprocess
    import sys

    env = {**os.environ, "BASED_SWA_BWD": "fast"}
    out = subprocess.run([sys.executable, "-c", "import based_kernels.sliding_window"], env=env, capture_output=True,
                         text=True, cwd=pathlib.Path(__file__).resolve().parents[2])
    assert out.returncode != 0 and "BASED_SWA_BWD must be 'split' or 'fused'; got 'fast'" in out.stderr, out.stderr


@pytest.mark.gpu
@pytest.mark.parametrize("D, Hkv, P, varlen", [(64, 16, 0, False), (64, 4, 128, False), (112, 16, 0, True),
                                               (128, 4, 128, False)])
def test_gpu_fused_backward_bf16_real_sizes(D, Hkv, P, varlen, monkeypatch):
    monkeypatch.setattr(ops, "BWD", "fused")
    check_bf16_real_sizes(D, Hkv, P, varlen)


@pytest.mark.gpu
def test_gpu_fused_backward_strips_and_nan_bf16(monkeypatch):
    monkeypatch.setattr(ops, "_scratch", nan_scratch)
    monkeypatch.setattr(ops, "BWD", "fused")
    q, k, v, prefix = make(2, 3000, 8, 4, 64, torch.bfloat16, 100, seed=4)
    do = torch.randn(2, 3000, 8, 64, device=DEV, dtype=torch.bfloat16)
    runs = []
    for strip in (128, 1024):
        monkeypatch.setattr(ops, "STRIP", strip)
        runs.append(fused_grads(q, k, v, prefix, 128, do))
    assert all(torch.equal(a, b) for a, b in zip(*runs))
    check_nan_confined("k", False, 600, 350, 128, 64, torch.bfloat16)
    check_confining_equals_plain(2, 1000, 8, 4, 64, 128, 128, torch.bfloat16)


# ---------------------------------------------------------------- decode step over the ring buffer
def step_inputs(B, H, D, dtype, seed, strided=False):
    """q, k, v ``[B, H, D]``; strided: views of one ``[B, H, 3D]`` tensor, as the mixer's split of its qkv."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    if strided:
        return torch.randn(B, H, 3 * D, generator=g).to(DEV, dtype).split(D, dim=-1)
    return tuple(torch.randn(B, H, D, generator=g).to(DEV, dtype) for _ in range(3))


def run_steps(start, H, D, W, dtype, steps, seed=0, strided=False, pos_dtype=torch.int64):
    """``steps`` decode steps from positions ``start`` (ragged) on a ring of random contents (stale slots too):
    the fused step (Triton) and the torch step (the mixer's former code) on bitwise copies of the ring, and the
    torch step in fp64. Returns per step ``(o_fused, o_torch, o_fp64)`` and the final rings."""
    B = len(start)
    g = torch.Generator(device="cpu").manual_seed(seed + 1000)
    rings = [torch.randn(B, W + 1, H, D, generator=g).to(DEV, dtype) for _ in range(2)]
    fused, ref, r64 = [r.clone() for r in rings], [r.clone() for r in rings], [r.double() for r in rings]
    pos = torch.tensor(start, device=DEV, dtype=pos_dtype)
    outs = []
    for t in range(steps):
        q, k, v = step_inputs(B, H, D, dtype, seed + t, strided)
        o = sliding_window_step(q, k, v, *fused, pos, window=W, backend="triton")
        o_ref = sliding_window_step(q, k, v, *ref, pos, window=W, backend="torch")
        o64 = sliding_window_step(q.double(), k.double(), v.double(), *r64, pos, window=W, backend="torch")
        assert o.dtype == dtype and o.shape == (B, H, D)
        outs.append((o, o_ref, o64))
        pos = pos + 1
    return outs, fused, ref


# based-360m, based-1.3b (padded to 128, strided q / k / v) in both dtypes, a power of two; 64 and 128 run the same
# unpadded path (another BLOCK_D), so each in one dtype
@pytest.mark.parametrize("D, dtype", [(64, torch.float32), (112, torch.float32), (112, torch.bfloat16),
                                      (128, torch.bfloat16)], ids=["64-fp32", "112-fp32", "112-bf16", "128-bf16"])
def test_step_matches_torch_step(D, dtype):
    """Positions below, at and above the window (0, 1, 127, 128, 129, 300; ragged across the batch), W = 128:
    outputs vs the torch step within fp32 rounding (fp32), or in bf16 every element within one bf16 ulp of the
    fp64 step (the output's rounding: fp32 accumulation inside; one ulp, not half, because the interpreter's
    fp32 -> bf16 cast truncates where a GPU rounds to nearest); the rings bitwise equal after every step."""
    outs, fused, ref = run_steps([0, 1, 127, 128, 129, 300], 2, D, 128, dtype, steps=3, seed=D,
                                 strided=D == 112)
    for o, o_ref, o64 in outs:
        if dtype == torch.float32:
            torch.testing.assert_close(o, o_ref, rtol=1e-5, atol=1e-6)
            assert rel(o, o64) < 1e-6
        else:
            ulp = torch.ldexp(torch.ones_like(o64), torch.frexp(o64)[1] - 8)  # bf16's spacing at |o64|
            err = (o.double() - o64).abs()
            assert (err <= ulp + 1e-6).all(), (err / ulp).max()
            assert rel(o, o64) < 4e-3 and rel(o_ref, o64) < 4e-3
    assert all(torch.equal(a, b) for a, b in zip(fused, ref))


@pytest.mark.parametrize("launch", [(16, 4, False), (8, 1, False), (32, 2, True)])
def test_step_launch_configs(launch, monkeypatch):
    """The launch alternatives benchmarks/decode_kernels.py times through ``ops.STEP`` (slot block BR, warps,
    V loaded late or with K): outputs within fp32 rounding of the fp64 step at positions below, at and past a
    window of 20 (BR 16 / 8 / 32: a ring of 21 slots in 2 / 3 / 1 blocks), the rings bitwise the torch step's."""
    monkeypatch.setattr(ops, "STEP", launch)
    outs, fused, ref = run_steps([0, 5, 19, 20, 21, 57], 2, 24, 20, torch.float32, steps=3, seed=7, strided=True)
    for o, o_ref, o64 in outs:
        torch.testing.assert_close(o, o_ref, rtol=1e-5, atol=1e-6)
        assert rel(o, o64) < 1e-6
    assert all(torch.equal(a, b) for a, b in zip(fused, ref))


@pytest.mark.gpu
@pytest.mark.parametrize("D", [64, 112])  # based-360m, based-1.3b
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_gpu_step_real_sizes(D, dtype):
    """The fused decode step compiled, at decode sizes (batch 128 with ragged positions below, at and past the
    window, 16 heads, W 128, q / k / v strided views of one qkv as in the mixer), 4 steps: bf16 outputs within one
    bf16 ulp of the fp64 step (fp32 within 1e-6 relative: its products are elementwise fp32, no tensor cores), the
    rings bitwise the torch step's."""
    start = [0, 1, 127, 128, 129, 300] + [(37 * i) % 400 for i in range(122)]
    outs, fused, ref = run_steps(start, 16, D, 128, dtype, steps=4, seed=D, strided=True)
    for o, o_ref, o64 in outs:
        if dtype == torch.float32:
            assert rel(o, o64) < 1e-6 and rel(o_ref, o64) < 1e-5
        else:
            ulp = torch.ldexp(torch.ones_like(o64), torch.frexp(o64)[1] - 8)  # bf16's spacing at |o64|
            assert ((o.double() - o64).abs() <= ulp + 1e-6).all()
            assert rel(o, o64) < 4e-3
    assert all(torch.equal(a, b) for a, b in zip(fused, ref))


def test_step_first_token_and_stale_slots():
    """At p = 0 only the new token is visible (o = v), whatever the other slots hold (also NaN: the fused step
    never reads a masked slot); a slot r < p of a young sequence is visible, r > p is not."""
    B, H, D, W = 2, 2, 16, 7
    q, k, v = step_inputs(B, H, D, torch.float32, 5)
    kc, vc = (torch.full((B, W + 1, H, D), float("nan"), device=DEV) for _ in range(2))
    pos = torch.zeros(B, dtype=torch.int64, device=DEV)
    o = sliding_window_step(q, k, v, kc, vc, pos, window=W, backend="triton")
    assert torch.equal(o, v) and torch.equal(kc[:, 0], k) and torch.equal(vc[:, 0], v)
    assert kc[:, 1:].isnan().all() and vc[:, 1:].isnan().all()


# the ring wraps twice: 8 slots (one block of ops.STEP's 8), 21 slots (three blocks, the last partial); W = 128 above
@pytest.mark.parametrize("W, T", [(7, 20), (20, 45)])
def test_step_decode_equals_full_attention(W, T):
    """T decode steps from position 0 (one sequence per batch row, zero rings) equal the dense sliding-window
    attention reference over the whole sequence (fp64 oracle)."""
    B, H, D = 2, 2, 32
    g = torch.Generator(device="cpu").manual_seed(W)
    q, k, v = (torch.randn(B, T, H, D, generator=g).to(DEV) for _ in range(3))
    kc, vc = (torch.zeros(B, W + 1, H, D, device=DEV) for _ in range(2))
    pos = torch.zeros(B, dtype=torch.int32, device=DEV)
    outs = []
    for t in range(T):
        outs.append(sliding_window_step(q[:, t], k[:, t], v[:, t], kc, vc, pos, window=W, backend="triton"))
        pos += 1
    o_ref = reference(q.double(), k.double(), v.double(), window=W)
    assert rel(torch.stack(outs, 1), o_ref) < 1e-6


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_step_errors(backend):
    B, H, D, W = 2, 4, 16, 5
    q, k, v = step_inputs(B, H, D, torch.float32, 7)
    kc, vc = (torch.zeros(B, W + 1, H, D, device=DEV) for _ in range(2))
    pos = torch.tensor([3, 9], device=DEV)
    step = lambda *a, **kw: sliding_window_step(*a, **{"window": W, "backend": backend, **kw})  # noqa: E731
    with pytest.raises(ValueError, match="no GQA"):
        step(q, k[:, :2], v[:, :2], kc[:, :, :2], vc[:, :, :2], pos)
    with pytest.raises(ValueError, match=r"window \+ 1"):
        step(q, k, v, kc[:, :W], vc[:, :W], pos)
    with pytest.raises(ValueError, match=r"window \+ 1"):
        step(q, k, v, kc, vc, pos, window=W + 1)
    with pytest.raises(ValueError, match="window must be >= 0"):
        step(q, k, v, kc, vc, pos, window=-1)
    with pytest.raises(ValueError, match="dtypes"):
        step(q, k, v, kc.double(), vc, pos)
    with pytest.raises(ValueError, match="contiguous last dim"):
        step(q, k, v, kc.transpose(1, 3).contiguous().transpose(1, 3), vc, pos)
    for bad in (pos.float(), pos[:1], pos.bool()):
        with pytest.raises(ValueError, match="integer tensor"):
            step(q, k, v, kc, vc, bad)
    with pytest.raises(ValueError, match="one shape"):
        step(q, k[:1], v, kc, vc, pos)
    assert not kc.any() and not vc.any()  # refused calls write nothing
    o = step(q, k, v, kc, vc, pos)
    assert o.shape == (B, H, D) and torch.equal(kc[0, 3], k[0]) and torch.equal(kc[1, 9 % (W + 1)], k[1])
