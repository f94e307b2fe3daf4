"""RMSNorm (based_kernels.rms_norm) against the fp64 formula y = x * rsqrt(mean(x^2) + eps) * w: y, dx and dw under
a random dy, odd shapes (D not a power of two, rows not a block multiple, several backward programs), 3-D and
strided inputs, low-precision weights, tiny and large magnitudes, an output dtype other than x's (fp32 in, bf16 /
fp16 out: fp32_residual_connection), input errors, determinism, opcheck and torch.compile. CPU runs the kernels under TRITON_INTERPRET=1 in fp32 and fp16 (the interpreter truncates when it
rounds to bf16, so bf16 is checked on the GPU); bf16 at the models' sizes is marked gpu."""
import pytest
import torch
import torch.nn.functional as F

import based_kernels
from based_kernels.rms_norm import kernels, ops

from ..distributed import run_distributed

DEV = "cuda" if torch.cuda.is_available() else "cpu"
forked_cpu = pytest.mark.skipif(torch.cuda.is_available(), reason="forked CPU workers, kernels under the interpreter")


def rel(a, b):
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm()).item()


def make(shape, dtype, w_dtype, scale=1.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(shape, generator=g) * scale).to(DEV, dtype)
    w = (torch.rand(shape[-1], generator=g) + 0.5).to(DEV, w_dtype)
    dy = torch.randn(shape, generator=g).to(DEV, dtype)
    return x, w, dy


def fp64_reference(x, w, dy, eps):
    """y, dx, dw of the formula in fp64 from the same (rounded) inputs, with w rounded to x's dtype (the op's
    ``weight.to(x.dtype)`` semantics)."""
    x64 = x.detach().double().requires_grad_()
    w64 = w.detach().to(x.dtype).double().requires_grad_()
    y = x64 * torch.rsqrt(x64.pow(2).mean(-1, keepdim=True) + eps) * w64
    dx, dw = torch.autograd.grad(y, (x64, w64), dy.double())
    return y, dx, dw


def run(x, w, dy, eps, **kw):
    x, w = x.detach().requires_grad_(), w.detach().requires_grad_()
    y = based_kernels.rms_norm(x, w, eps, **kw)
    dx, dw = torch.autograd.grad(y, (x, w), dy)
    return y, dx, dw


@pytest.mark.parametrize("shape", [(37, 45), (5, 3, 37), (7, 1000), (300, 64)])
@pytest.mark.parametrize("dtype, w_low, tol", [(torch.float32, False, 2e-6), (torch.float16, False, 1e-3),
                                               (torch.float16, True, 1e-3)])
def test_matches_fp64(shape, dtype, w_low, tol):
    """(37, 45): 64-wide tile, a partial last row block, 5 backward programs of 8 rows (the last 5);
    (300, 64): 13 programs of 24 rows. Errors no larger than PyTorch's F.rms_norm on the same inputs."""
    w_dtype = dtype if w_low else torch.float32
    x, w, dy = make(shape, dtype, w_dtype)
    y, dx, dw = run(x, w, dy, 1e-5, backend="triton")
    assert y.shape == x.shape and y.dtype == dx.dtype == dtype and dw.dtype == w_dtype
    refs = fp64_reference(x, w, dy, 1e-5)
    torch_out = run(x, w, dy, 1e-5, backend="torch")
    for name, ours, theirs, ref in zip(("y", "dx", "dw"), (y, dx, dw), torch_out, refs):
        err, torch_err = rel(ours, ref), rel(theirs, ref)
        assert err < tol, (name, err)
        assert err <= 1.5 * torch_err + 1e-7, (name, err, torch_err)


@pytest.mark.parametrize("scale", [1e-4, 1e3])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_tiny_and_large_inputs_stay_accurate(scale, dtype):
    """x ~ 1e-4 (below eps = 1e-12 barely matters; fp16 subnormal range) and x ~ 1e3 (x^2 = 1e6 would overflow
    fp16; the statistics are fp32)."""
    x, w, dy = make((37, 45), dtype, torch.float32, scale=scale, seed=3)
    outs = run(x, w, dy, 1e-12, backend="triton")
    tol = 2e-6 if dtype == torch.float32 else 1e-3
    for name, ours, ref in zip(("y", "dx", "dw"), outs, fp64_reference(x, w, dy, 1e-12)):
        assert torch.isfinite(ours).all() and rel(ours, ref) < tol, (name, rel(ours, ref))


def test_strided_rows_expanded_dy_and_max_width():
    """x as a column slice of a wider buffer (row stride 64, not D = 45); dy from y.sum() (an expanded, stride-0
    gradient); D = MAX_D = 16384 (one row per 16384-wide tile)."""
    buf, w, _ = make((37, 64), torch.float32, torch.float32, seed=4)
    x = buf[:, :45]
    w = w[:45]
    assert x.stride(0) == 64
    y, dx, dw = run(x, w, torch.ones(37, 45, device=DEV), 1e-5, backend="triton")
    xs = x.detach().requires_grad_()
    ws = w.detach().requires_grad_()
    based_kernels.rms_norm(xs, ws, 1e-5, backend="triton").sum().backward()
    for ours, ref, other in zip((y, dx, dw), fp64_reference(x, w, torch.ones(37, 45, device=DEV), 1e-5),
                                (None, xs.grad, ws.grad)):
        assert rel(ours, ref) < 2e-6
        if other is not None:
            assert torch.equal(ours, other)
    x, w, dy = make((2, kernels.MAX_D), torch.float32, torch.float32, seed=5)
    for ours, ref in zip(run(x, w, dy, 1e-5, backend="triton"), fp64_reference(x, w, dy, 1e-5)):
        assert rel(ours, ref) < 2e-6


def _bf16_ulp(t):
    """The spacing of bf16 numbers at |t| (8 significant bits): one truncation or rounding is within it."""
    t = t.abs().double().clamp_min(1e-30)
    return torch.exp2(torch.floor(torch.log2(t)) - 7)


@pytest.mark.parametrize("shape", [(37, 45), (5, 3, 37), (7, 1000)])
@pytest.mark.parametrize("x_dtype, out_dtype", [(torch.float32, torch.bfloat16), (torch.float32, torch.float16),
                                                (torch.float16, torch.float32)])
@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_out_dtype_matches_fp64(shape, x_dtype, out_dtype, backend):
    """``out_dtype`` other than x's (fp32_residual_connection: the fp32 residual normed into bf16): y in out_dtype
    from fp32 statistics of the unrounded x, rounded once; dx in x's dtype from dy in out_dtype; dw in w's dtype
    (bf16, as in bf16 models). Odd shapes as in test_matches_fp64 (its (300, 64) too runs the same elementwise
    out_dtype code with several backward programs, as (37, 45) does here, at ~4.5 s a case in the interpreter).
    The interpreter truncates on its bf16 stores (see the module docstring), so bf16 y is checked to within one bf16
    spacing of the fp64 value, elementwise."""
    x, w, _ = make(shape, x_dtype, torch.bfloat16, seed=11)
    dy = torch.randn(shape, generator=torch.Generator().manual_seed(12)).to(DEV, out_dtype)
    y, dx, dw = run(x, w, dy, 1e-5, backend=backend, out_dtype=out_dtype)
    assert y.shape == x.shape and y.dtype == out_dtype and dx.dtype == x_dtype and dw.dtype == torch.bfloat16
    y64, dx64, dw64 = fp64_reference(x, w, dy, 1e-5)
    if out_dtype == torch.bfloat16:
        assert ((y.double() - y64).abs() <= _bf16_ulp(y64)).all()
        assert rel(y, y64) < 4e-3
    else:
        assert rel(y, y64) < (6e-4 if out_dtype == torch.float16 else 2e-6), rel(y, y64)
    # the statistics and x come unrounded into y: fp32 in, fp16 out is as accurate as fp16 rounding allows,
    # where normalizing a bf16-rounded copy of x would cost ~2^-9 (about 1.5e-3)
    assert rel(dx, dx64) < (2e-6 if x_dtype == torch.float32 else 1e-3), rel(dx, dx64)
    assert rel(dw, dw64) < 4e-3, rel(dw, dw64)  # one bf16 rounding of the fp32 sum
    same = run(x, w, dy.to(x_dtype), 1e-5, backend=backend)  # out_dtype=None and == x's dtype: x's dtype
    assert same[0].dtype == x_dtype
    assert based_kernels.rms_norm(x, w, 1e-5, backend=backend, out_dtype=x_dtype).dtype == x_dtype


def test_out_dtype_triton_equals_torch_and_rounds_once():
    """fp32 in, bf16 out: the kernel's y is its own fp32 result (out_dtype None) stored in bf16 (one rounding in
    the store: within a bf16 spacing, the interpreter truncating), and dx / dw equal the torch path's to fp32
    rounding. A strided x (row stride 64, D 45) and a dy made non-contiguous (transposed copy) on the way."""
    buf, w, _ = make((37, 64), torch.float32, torch.bfloat16, seed=13)
    x = buf[:, :45]
    w = w[:45]
    dy = torch.randn(45, 37, generator=torch.Generator().manual_seed(14)).to(DEV, torch.bfloat16).t()
    y, dx, dw = run(x, w, dy, 1e-5, backend="triton", out_dtype=torch.bfloat16)
    y32 = based_kernels.rms_norm(x, w, 1e-5, backend="triton")
    assert y32.dtype == torch.float32
    assert ((y.double() - y32.double()).abs() <= _bf16_ulp(y32)).all()
    ty, tdx, tdw = run(x, w, dy, 1e-5, backend="torch", out_dtype=torch.bfloat16)
    assert rel(dx, tdx) < 1e-6 and torch.allclose(dw.float(), tdw.float(), rtol=8e-3, atol=0)


def test_out_dtype_errors():
    x, w, _ = make((4, 45), torch.float32, torch.float32)
    with pytest.raises(TypeError, match="out_dtype"):
        based_kernels.rms_norm(x, w, 1e-5, out_dtype=torch.int32)
    with pytest.raises(TypeError, match="out_dtype"):
        based_kernels.rms_norm(x, w, 1e-5, backend="triton", out_dtype=torch.float64)


def test_deterministic():
    x, w, dy = make((300, 64), torch.float32, torch.float32, seed=6)
    a, b = run(x, w, dy, 1e-5, backend="triton"), run(x, w, dy, 1e-5, backend="triton")
    assert all(torch.equal(p, q) for p, q in zip(a, b))


def test_backend_resolution():
    """backend=None: Triton for CUDA tensors, torch on CPU (bitwise F.rms_norm), use_backend overrides."""
    x, w, _ = make((37, 45), torch.float32, torch.float32)
    ref = F.rms_norm(x, (45,), w, 1e-5)
    if DEV == "cpu":
        assert torch.equal(based_kernels.rms_norm(x, w, 1e-5), ref)
        with based_kernels.use_backend("triton"):
            y = based_kernels.rms_norm(x.requires_grad_(), w, 1e-5)
            assert type(y.grad_fn).__name__ == "RMSNormFunctionBackward"
            x = x.detach()
    with based_kernels.use_backend("torch"):
        assert torch.equal(based_kernels.rms_norm(x, w, 1e-5), ref)
    empty = torch.empty(0, 45, device=DEV)
    assert based_kernels.rms_norm(empty, w, 1e-5, backend="triton").shape == (0, 45)


def test_bad_inputs_raise_clear_errors():
    x, w, _ = make((4, 45), torch.float32, torch.float32)
    with pytest.raises(ValueError, match="weight must be"):
        based_kernels.rms_norm(x, w[:44], 1e-5)
    with pytest.raises(ValueError, match="weight must be"):
        based_kernels.rms_norm(x, w[None], 1e-5, backend="triton")
    big = torch.zeros(2, kernels.MAX_D + 1, device=DEV)
    with pytest.raises(ValueError, match="16384"):
        based_kernels.rms_norm(big, torch.ones(kernels.MAX_D + 1, device=DEV), 1e-5, backend="triton")
    with pytest.raises(TypeError, match="float64"):
        based_kernels.rms_norm(x.double(), w, 1e-5, backend="triton")
    with pytest.raises(TypeError, match="floating point"):
        based_kernels.rms_norm(x.long(), w, 1e-5)
    with pytest.raises(ValueError, match="D >= 1"):
        based_kernels.rms_norm(torch.zeros(3, 0), torch.zeros(0), 1e-5)
    with pytest.raises(ValueError, match="backend"):
        based_kernels.rms_norm(x, w, 1e-5, backend="cuda")


def _compiled(rank, world):
    x, w, dy = make((37, 45), torch.float32, torch.float32, seed=7)
    y, rstd = ops.rms_norm_fwd_op(x, w, 1e-5)
    torch.library.opcheck(ops.rms_norm_fwd_op, (x, w.requires_grad_(), 1e-5))
    torch.library.opcheck(ops.rms_norm_fwd_op, (x, w, 1e-5, torch.bfloat16))
    torch.library.opcheck(ops.rms_norm_bwd_op, (dy.bfloat16(), x, w.detach(), rstd))
    torch.library.opcheck(ops.rms_norm_bwd_op, (dy, x, w.detach(), rstd))
    f = torch.compile(lambda x, w: based_kernels.rms_norm(x, w, 1e-5, backend="triton"), backend="aot_eager",
                      fullgraph=True)
    xc, wc = x.detach().requires_grad_(), w.detach().requires_grad_()
    outs = (y := f(xc, wc), *torch.autograd.grad(y, (xc, wc), dy))
    errs = [rel(a, b) for a, b in zip(outs, fp64_reference(x, w, dy, 1e-5))]
    f16 = torch.compile(lambda x, w: based_kernels.rms_norm(x, w, 1e-5, backend="triton", out_dtype=torch.float16),
                        backend="aot_eager", fullgraph=True)
    xc = x.detach().requires_grad_()
    y = f16(xc, wc)
    assert y.dtype == torch.float16
    dx = torch.autograd.grad(y, xc, dy.half())[0]
    y64, dx64, _ = fp64_reference(x, w, dy.half(), 1e-5)
    return errs + [rel(y, y64) / 300, rel(dx, dx64)]  # fp16 y: ~2e-4, scaled to the fp32 bound


@forked_cpu
def test_custom_ops_and_torch_compile():
    """opcheck of both custom ops (fake impls, autograd registration) and torch.compile(fullgraph=True) == fp64; in
    a forked worker (see test_cross_entropy: opcheck / compiled backward in the parent break later forks)."""
    errs = run_distributed(_compiled, 1)[0]
    assert max(errs) < 2e-6, errs


# --------------------------------------------------------------------------------------------------------- GPU
@pytest.mark.gpu
@pytest.mark.parametrize("rows, d, w_dtype", [(32768, 1024, torch.bfloat16), (8192, 2048, torch.float32)])
def test_bf16_model_sizes_vs_fp64_and_torch(rows, d, w_dtype):
    """bf16 at based-360m / based-1.3b widths (a bf16 and an fp32 weight: each new dtype combination autotunes
    again): errors vs the fp64 formula no larger than F.rms_norm's (y: both round once; dx, dw: fp32 math),
    deterministic."""
    x, w, dy = make((rows, d), torch.bfloat16, w_dtype, seed=8)
    ours = run(x, w, dy, 1e-5, backend="triton")
    theirs = run(x, w, dy, 1e-5, backend="torch")
    refs = fp64_reference(x, w, dy, 1e-5)
    for name, a, t, ref in zip(("y", "dx", "dw"), ours, theirs, refs):
        err, torch_err = rel(a, ref), rel(t, ref)
        assert err < 5e-3 and err <= 1.05 * torch_err + 1e-6, (name, err, torch_err)
    again = run(x, w, dy, 1e-5, backend="triton")
    assert all(torch.equal(p, q) for p, q in zip(ours, again))


@pytest.mark.gpu
@pytest.mark.parametrize("rows, d", [(32768, 1024), (8192, 1792)])
def test_fp32_in_bf16_out_model_sizes(rows, d):
    """fp32_residual_connection on the GPU: fp32 x, bf16 weight, bf16 y / dy (compiled kernels round to nearest):
    y within F.rms_norm-then-round's error, dx (fp32) and dw at fp32 / bf16 accuracy, deterministic."""
    x, w, _ = make((rows, d), torch.float32, torch.bfloat16, seed=9)
    dy = torch.randn(rows, d, generator=torch.Generator().manual_seed(10)).to(DEV, torch.bfloat16)
    ours = run(x, w, dy, 1e-5, backend="triton", out_dtype=torch.bfloat16)
    theirs = run(x, w, dy, 1e-5, backend="torch", out_dtype=torch.bfloat16)
    assert ours[0].dtype == torch.bfloat16 and ours[1].dtype == torch.float32 and ours[2].dtype == torch.bfloat16
    refs = fp64_reference(x, w, dy, 1e-5)
    for name, a, t, ref in zip(("y", "dx", "dw"), ours, theirs, refs):
        err, torch_err = rel(a, ref), rel(t, ref)
        assert err <= 1.05 * torch_err + 1e-6, (name, err, torch_err)
    again = run(x, w, dy, 1e-5, backend="triton", out_dtype=torch.bfloat16)
    assert all(torch.equal(p, q) for p, q in zip(ours, again))


# -- the residual add fused with the norm (inference) ------------------------------------------------------------
def add_inputs(shape, x_dtype, r_dtype, bias_dtype, seed=11):
    """x (a sublayer's output) as a column slice of a wider buffer (row stride != D), the residual contiguous,
    a bias or None."""
    g = torch.Generator().manual_seed(seed)
    D = shape[-1]
    x = torch.randn(*shape[:-1], D + 3, generator=g).to(DEV, x_dtype)[..., 1 : 1 + D]
    r = (torch.randn(shape, generator=g) * 4).to(DEV, r_dtype)
    b = None if bias_dtype is None else (torch.randn(D, generator=g) * 0.1).to(DEV, bias_dtype)
    w = (torch.rand(D, generator=g) + 0.5).to(DEV, torch.float16)
    return x, r, b, w


ADD_CASES = [  # (x, residual, bias, out_dtype): an fp32 residual stream normed to fp16; all-fp32; all-fp16
    (torch.float16, torch.float32, torch.float16, torch.float16),
    (torch.float16, torch.float32, None, torch.float16),
    (torch.float32, torch.float32, torch.float32, None),
    (torch.float16, torch.float16, torch.float16, None),
    (torch.float16, torch.float16, None, None),
]


@pytest.mark.parametrize("shape", [(37, 45), (5, 3, 37), (7, 1000)])
@pytest.mark.parametrize("x_dtype, r_dtype, b_dtype, out_dtype", ADD_CASES)
@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_add_rms_norm(shape, x_dtype, r_dtype, b_dtype, out_dtype, backend):
    """h bitwise the unfused residual add (casts and roundings of reference.residual_add: the fp16 residual's two
    roundings included); y within one rounding of rms_norm(h) and of the fp64 formula on h."""
    from based_kernels.rms_norm.reference import residual_add

    x, r, b, w = add_inputs(shape, x_dtype, r_dtype, b_dtype)
    with torch.inference_mode():
        y, h = based_kernels.add_rms_norm(x, r, w, 1e-5, bias=b, out_dtype=out_dtype, backend=backend)
        h_ref = residual_add(r, x, b)
        y_ref = based_kernels.rms_norm(h_ref, w, 1e-5, out_dtype=out_dtype, backend=backend)
    assert h.dtype == r_dtype and h.shape == r.shape and h.is_contiguous() and torch.equal(h, h_ref)
    assert y.dtype == (out_dtype or r_dtype) and y.shape == r.shape
    tol = 2e-6 if y.dtype == torch.float32 else 1e-3
    assert (y.double() - y_ref.double()).abs().max().item() <= tol * y_ref.double().abs().max().item()
    y64 = fp64_reference(h, w, torch.zeros_like(h), 1e-5)[0]
    assert rel(y, y64) < tol, rel(y, y64)


def test_add_rms_norm_errors():
    x, r, b, w = add_inputs((4, 16), torch.float32, torch.float32, torch.float32)
    with pytest.raises(ValueError, match=r"x \(4, 16\) and residual \(4, 15\) must have the same shape"):
        based_kernels.add_rms_norm(x, r[:, :15], w)
    with pytest.raises(ValueError, match=r"bias must be \[D\] = \[16\]"):
        based_kernels.add_rms_norm(x, r, w, bias=b[:8])
    with pytest.raises(ValueError, match=r"weight must be \[D\] = \[16\]"):
        based_kernels.add_rms_norm(x, r, w[:8])
    with pytest.raises(RuntimeError, match="add_rms_norm has no backward"):
        based_kernels.add_rms_norm(x.requires_grad_(), r, w)
    with pytest.raises(TypeError, match=r"got residual torch.float64 \(use backend='torch'\)"):
        based_kernels.add_rms_norm(x.detach(), r.double(), w, backend="triton")


@pytest.mark.gpu
@pytest.mark.parametrize("bias", [False, True])
def test_add_rms_norm_decode_size(bias):
    """A based-1.3b decode step's add + norm: 128 rows x 1792, bf16 sublayer output (a strided view) and bias,
    fp32 residual, bf16 out: h bitwise the unfused add, y within one bf16 rounding of rms_norm(h) (the two
    kernels may sum the squares in another order), deterministic."""
    from based_kernels.rms_norm.reference import residual_add

    x, r, b, w = add_inputs((128, 1792), torch.bfloat16, torch.float32, torch.bfloat16 if bias else None, seed=12)
    w = w.to(torch.bfloat16)
    with torch.inference_mode():
        y, h = based_kernels.add_rms_norm(x, r, w, 1e-5, bias=b, out_dtype=torch.bfloat16)
        h_ref = residual_add(r, x, b)
        y_ref = based_kernels.rms_norm(h_ref, w, 1e-5, out_dtype=torch.bfloat16)
        again = based_kernels.add_rms_norm(x, r, w, 1e-5, bias=b, out_dtype=torch.bfloat16)
    assert torch.equal(h, h_ref) and torch.equal(y, again[0]) and torch.equal(h, again[1])
    assert ((y.float() - y_ref.float()).abs() <= 2 ** -7 * y_ref.float().abs()).all()
