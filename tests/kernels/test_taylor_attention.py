"""Triton Taylor linear attention vs the fp64 oracles of based_kernels.taylor_attention.reference.

CPU: the kernels run under TRITON_INTERPRET=1 (set by conftest) in fp32/fp16 (bf16 tl.dot is wrong in the
interpreter). GPU (marked ``gpu``): bf16 up to T = 32k against an fp64 reference.
"""
import pytest
import torch

from based_kernels.taylor_attention import (
    feature_dim,
    taylor_attention_chunked,
    taylor_attention_quadratic,
    taylor_attention_step,
    taylor_attention_step_buffered,
    taylor_linear_attention,
    taylor_linear_attention_step,
)
from based_kernels import _common
from based_kernels._common import dot_precision
from based_kernels.taylor_attention import ops
from based_kernels.taylor_attention.reference import taylor_state_with_buffer

from ..memcheck import assert_memcheck_clean
from .poison import assert_equal_where, bad_cu_seqlens, clean_and_poisoned

DEV = "cuda" if torch.cuda.is_available() else "cpu"
# fp32 inputs: exact fp32 products in the interpreter; on the GPU what torch.get_float32_matmul_precision() asks
# for ("highest", torch's default and the tests': IEEE fp32 products; see
# test_fp32_is_fp32_accurate_at_default_precision)
TOL32 = 2e-5 if DEV == "cpu" else 2e-3


@pytest.fixture
def f32_precision():
    """Sets torch's float32 matmul precision for a test (``f32_precision("high")``) and restores it afterwards."""
    old = torch.get_float32_matmul_precision()
    yield torch.set_float32_matmul_precision
    torch.set_float32_matmul_precision(old)


def rel(a, b):
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def make(B, T, H, F, DV, dtype=torch.float32, state=False, n_states=None, device=DEV, scale=1.0):
    g = torch.Generator(device="cpu").manual_seed(1000 * T + 10 * H + DV)
    q = (torch.randn(B, T, H, F, generator=g) * scale).to(device, dtype)
    k = (torch.randn(B, T, H, F, generator=g) * scale).to(device, dtype)
    v = torch.randn(B, T, H, DV, generator=g).to(device, dtype)
    h0 = None
    if state:
        n = n_states or B
        D = feature_dim(F)
        # a plausible state: that of 20 random earlier tokens, plus noise (not the state of any tokens)
        kk = torch.randn(n, 20, H, F, generator=g)
        vv = torch.randn(n, 20, H, DV, generator=g)
        _, (S, z) = taylor_attention_quadratic(kk, kk, vv, output_final_state=True)
        S = S + 0.1 * torch.randn(n, H, D, DV, generator=g)
        h0 = (S.to(device), z.to(device))
    return q, k, v, h0


def run_with_grads(fn, q, k, v, h0, want_final=True, **kw):
    """Forward + backward of a loss touching y and the final state; returns outputs and every gradient."""
    leaves = [t.detach().clone().requires_grad_() for t in (q, k, v)]
    st = None if h0 is None else tuple(t.detach().clone().requires_grad_() for t in h0)
    y, fin = fn(*leaves, initial_state=st, output_final_state=want_final, **kw)
    g = torch.Generator(device="cpu").manual_seed(7)
    wy = torch.randn(y.shape, generator=g).to(y.device, torch.float64)
    loss = (y.double() * wy).sum()
    if want_final:
        ws = torch.randn(fin[0].shape, generator=g).to(y.device, torch.float64)
        wz = torch.randn(fin[1].shape, generator=g).to(y.device, torch.float64)
        loss = loss + 1e-2 * ((fin[0].double() * ws).sum() + (fin[1].double() * wz).sum())
    loss.backward()
    grads = [t.grad for t in leaves] + ([] if st is None else [t.grad for t in st])
    return y.detach(), fin, grads


def oracle(q, k, v, h0, want_final=True, **kw):
    q64, k64, v64 = (t.double() for t in (q, k, v))
    h64 = None if h0 is None else tuple(t.double() for t in h0)
    return run_with_grads(taylor_attention_quadratic, q64, k64, v64, h64, want_final, **kw)


def triton_fn(*a, **kw):
    return taylor_linear_attention(*a, backend="triton", **kw)


def check_all(got, want, tol, tol_grad=None):
    (y, fin, grads), (y_r, fin_r, grads_r) = got, want
    tol_grad = tol_grad or tol
    assert rel(y, y_r) < tol, rel(y, y_r)
    if fin_r is not None:
        assert rel(fin[0], fin_r[0]) < tol and rel(fin[1], fin_r[1]) < tol, (rel(fin[0], fin_r[0]),
                                                                              rel(fin[1], fin_r[1]))
    names = ["dq", "dk", "dv", "dS0", "dz0"]
    for name, a, b in zip(names, grads, grads_r):
        assert a is not None and torch.isfinite(a).all(), name
        assert rel(a, b) < tol_grad, (name, rel(a, b))


# ---------------------------------------------------------------------------------------------------------
# CPU (interpreter) and GPU


@pytest.mark.parametrize("T, confine", [(1, False), (63, False), (65, False), (127, False), (65, True)],
                         ids=["1", "63", "65", "127", "65-confining"])
def test_forward_state_and_grads_fp32(T, confine, monkeypatch):
    """``confining``: the output pass's confining launch recomputes every tile (_common.ALWAYS_CONFINE), the path
    of inputs with a NaN or inf; otherwise it returns at once."""
    monkeypatch.setattr(_common, "ALWAYS_CONFINE", confine)
    q, k, v, h0 = make(1, T, 2, 16, 32, state=True)
    got = run_with_grads(triton_fn, q, k, v, h0)
    check_all(got, oracle(q, k, v, h0), TOL32)


def check_confining_equals_plain(B, T, H, DV, dtype, cu=None):
    """On clean inputs the output pass's confining launch gives the plain one's output bit for bit (what lets a NaN
    leave everything it cannot reach bitwise equal to a clean run, check_nan_confined)."""
    q, k, v, h0 = make(B, T, H, 16, DV, dtype=dtype, state=True, n_states=None if cu is None else len(cu) - 1)
    ys = []
    for confine in (False, True):
        _common.ALWAYS_CONFINE = confine
        try:
            ys.append(triton_fn(q, k, v, initial_state=h0, cu_seqlens=cu)[0])
        finally:
            _common.ALWAYS_CONFINE = False
    assert torch.equal(ys[0], ys[1]), (ys[0].double() - ys[1].double()).abs().max().item()


def test_confining_launch_equals_plain():
    check_confining_equals_plain(2, 70, 1, 48, torch.float32)  # two value blocks
    check_confining_equals_plain(1, 70, 1, 32, torch.float32, cu=torch.tensor([0, 5, 60, 70], device=DEV))


def test_no_state_and_other_shapes():
    """f = 8 (padded to 16), d_v = 48 (not a power of two, two value blocks), no initial state."""
    q, k, v, _ = make(1, 70, 3, 8, 48)
    got = run_with_grads(triton_fn, q, k, v, None)
    check_all(got, oracle(q, k, v, None), TOL32)


def test_fp16():
    q, k, v, h0 = make(1, 100, 2, 16, 32, dtype=torch.float16, state=True)
    got = run_with_grads(triton_fn, q, k, v, h0)
    check_all(got, oracle(q, k, v, h0), 3e-3, 5e-3)


class _Spy:
    """Wraps a launcher of ops.py and records ``record(kernel name, constexprs)`` of each launch (by default the
    PREC constexprs)."""

    def __init__(self, launcher, seen, record=lambda name, c: (name, c["PREC"], c.get("LOW_PREC"))):
        self.launcher, self.seen, self.record = launcher, seen, record

    def __call__(self, grid, args, **consts):
        self.seen.append(self.record(self.launcher.kernel.fn.__name__, consts))
        return self.launcher(grid, args, **consts)


def test_dot_precision_follows_the_float32_matmul_setting(f32_precision, monkeypatch):
    """fp32 inputs: the products' input_precision is read from torch's setting at every call, forward and backward
    (a constexpr: part of the launch key, so a changed setting compiles or reuses the other variant); bf16/fp16
    inputs keep tf32 whatever the setting."""
    want = {"highest": "ieee", "high": "ieee", "medium": "tf32"}  # "high": tf32x3 overflows shared memory (ops.py)
    for setting, prec in want.items():
        f32_precision(setting)
        assert dot_precision(torch.float32) == prec
        assert dot_precision(torch.bfloat16) == dot_precision(torch.float16) == "tf32"
    seen = []
    for name in ("_state_kernel", "_state_part_kernel", "_output_kernel", "_grad_kernel"):
        monkeypatch.setattr(ops, name, _Spy(getattr(ops, name), seen))
    part = ["taylor_chunk_state_part_kernel"] if ops.OUTPUT_SPLIT else []
    q, k, v, _ = make(1, 40, 1, 8, 16)
    for setting, prec in want.items():
        f32_precision(setting)
        for keep in (True, False):
            monkeypatch.setattr(ops, "KEEP_STATES", keep)
            seen.clear()
            run_with_grads(triton_fn, q, k, v, None)
            # forward: state + output pass; backward: (the state pass when the forward's states were not kept),
            # reverse state pass, gradient pass
            # (the output pass twice: plain, then confining, _common.launch_confined; its state part before it
            # where it is split, ops.OUTPUT_SPLIT)
            assert [n for n, _, _ in seen] == ["taylor_chunk_state_kernel", *part,
                                               *["taylor_chunk_output_kernel"] * 2,
                                               *["taylor_chunk_state_kernel"] * (1 if keep else 2),
                                               "taylor_chunk_grad_kernel"], seen
            assert all(p == prec for _, p, _ in seen), (setting, seen)
        assert seen[1][2] == ("ieee" if prec == "ieee" else "tf32x3"), seen  # the fp32 constant/linear state rows
    f32_precision("highest")
    seen.clear()
    run_with_grads(triton_fn, *(t.half() for t in (q, k, v)), None)
    assert seen and all(p == "tf32" for _, p, _ in seen), seen


@pytest.mark.parametrize("varlen", [False, True])
def test_fp32_close_to_fp64(f32_precision, varlen):
    """fp32 inputs at the default "highest" setting: no intermediate below fp32 (odd T, several chunks, two value
    blocks, an initial state). ~2e-7 in the interpreter; on the GPU the same (IEEE products)."""
    f32_precision("highest")
    T = 77
    cu = torch.tensor([0, 30, T], dtype=torch.int32, device=DEV) if varlen else None
    q, k, v, h0 = make(1, T, 2, 16, 48, state=True, n_states=2 if varlen else 1)
    got = run_with_grads(triton_fn, q, k, v, h0, cu_seqlens=cu)
    check_all(got, oracle(q, k, v, h0, cu_seqlens=cu), 1e-6)


def test_ieee_tiles(f32_precision, monkeypatch):
    """fp32 inputs at "highest" compile with ops.IEEE_TILES on a GPU (64-token chunks, 32-feature and 32-column
    blocks: IEEE products unroll into FMAs over the whole tile); here the kernels run at exactly those tiles in the
    interpreter, against fp64: packed documents over several chunks, two value blocks, initial states."""
    BT, BF, BV, _, _ = ops.IEEE_TILES
    monkeypatch.setattr(ops, "INTERPRET", False)
    assert ops._cfg("output", 16, 64, "ieee")[1:4] == (BT, BF, BV) != ops._cfg("output", 16, 64, "tf32")[1:4]
    monkeypatch.setattr(ops, "INTERPRET", True)
    monkeypatch.setattr(ops, "INTERPRET_TILES", (BT, BF, BV))
    f32_precision("highest")
    T = 150
    cu = torch.tensor([0, 1, 70, T], dtype=torch.int32, device=DEV)
    q, k, v, h0 = make(1, T, 1, 16, 40, state=True, n_states=3)
    got = run_with_grads(triton_fn, q, k, v, h0, cu_seqlens=cu)
    check_all(got, oracle(q, k, v, h0, cu_seqlens=cu), 1e-6)


def test_gradient_warps_below_chunk_128(monkeypatch):
    """The one-kernel gradient pass at 8 warps crashes at chunk 64 on an H100 (README): below chunk 128 the library
    launches it at ops.GRAD_WARPS_SMALL_CHUNK (4) warps at most, split at the configured warps; the other passes and
    chunk 128 as configured."""
    monkeypatch.setattr(ops, "INTERPRET", False)
    monkeypatch.setitem(ops.CONFIG, "grad", (32, 64, 8, 1))
    monkeypatch.setattr(ops, "GRAD_SPLIT", False)
    warps = {}
    for chunk in (64, 128):
        monkeypatch.setattr(ops, "CHUNK", chunk)
        warps[chunk] = {name: ops._cfg(name, 16, 64)[5] for name in ops.CONFIG}
    assert warps[128]["grad"] == 8 and warps[64]["grad"] == 4
    assert warps[64]["output"] == warps[128]["output"] == ops.CONFIG["output"][2]
    monkeypatch.setitem(ops.CONFIG, "grad", (32, 64, 2, 1))
    assert ops._cfg("grad", 16, 64)[5] == 2
    monkeypatch.setattr(ops, "GRAD_SPLIT", True)
    assert ops.grad_warps(64, 8) == 8


def test_output_pass_warps_at_narrow_value_blocks(monkeypatch):
    """The output pass at 8 warps read shared memory out of bounds at f 8, d_v 32 on an H100 (README): at value
    blocks of 32 columns or fewer the library launches it at ops.OUTPUT_NARROW_WARPS (4) warps at most; wider
    blocks, and the other passes, at the configured warps."""
    monkeypatch.setattr(ops, "INTERPRET", False)
    monkeypatch.setitem(ops.CONFIG, "output", (64, 64, 8, 2))
    assert ops.OUTPUT_NARROW_WARPS == 4
    assert [ops._cfg("output", f, dv)[5] for f, dv in ((8, 32), (8, 16), (16, 32), (8, 64), (16, 128))] == [
        4, 4, 4, 8, 8]
    monkeypatch.setitem(ops.CONFIG, "output", (64, 32, 8, 2))  # 32-column blocks at any d_v
    assert ops._cfg("output", 16, 128)[3:6:2] == (32, 4)
    monkeypatch.setitem(ops.CONFIG, "output", (64, 64, 2, 2))  # fewer warps than the cap: as configured
    assert ops._cfg("output", 8, 32)[5] == 2
    monkeypatch.setitem(ops.CONFIG, "state", (64, 32, 8, 1))
    assert ops._cfg("state", 8, 32)[5] == 8


def test_split_gradient_pass_only_at_verified_value_blocks(monkeypatch):
    """ops.GRAD_SPLIT on a GPU: split at value blocks of 64 columns or more; below (d_v <= 32, or BV 32 tiles, where
    the split dk / dv are wrong on an H100) the one-kernel pass, at its warps (chunk 64: at most 4). The
    interpreter runs split at every block (its tests check it against the one-kernel pass)."""
    monkeypatch.setattr(ops, "INTERPRET", False)
    monkeypatch.setattr(ops, "GRAD_SPLIT", True)
    monkeypatch.setattr(ops, "CHUNK", 64)
    monkeypatch.setitem(ops.CONFIG, "grad", (32, 64, 8, 1))
    assert ops.grad_split(64) and ops.grad_split(128) and not ops.grad_split(32) and not ops.grad_split(16)
    assert ops._cfg("grad", 16, 64)[5] == 8  # split: the configured warps
    assert ops._cfg("grad", 16, 32)[3:6:2] == (32, 4)  # d_v 32: one kernel, 4 warps at chunk 64
    monkeypatch.setitem(ops.CONFIG, "grad", (32, 32, 8, 1))
    assert ops._cfg("grad", 16, 128)[3:6:2] == (32, 4)
    monkeypatch.setattr(ops, "INTERPRET", True)
    assert ops.grad_split(16)
    monkeypatch.setattr(ops, "GRAD_SPLIT", False)
    assert not ops.grad_split(128)


def small_tiles(monkeypatch):
    """16-token chunks, 32-feature blocks and 16-column value blocks: many chunks, 9 feature blocks and several
    value blocks (dq, dk summed from per-block partials)."""
    monkeypatch.setattr(ops, "INTERPRET_TILES", (16, 32, 16))
    monkeypatch.setattr(ops, "CHUNK", 16)
    for name, (bf, bv, nw, ns) in list(ops.CONFIG.items()):
        monkeypatch.setitem(ops.CONFIG, name, (32, 16, nw, ns))


def test_small_tiles(monkeypatch):
    small_tiles(monkeypatch)
    q, k, v, h0 = make(2, 75, 1, 16, 40, state=True)
    got = run_with_grads(triton_fn, q, k, v, h0)
    check_all(got, oracle(q, k, v, h0), TOL32)


@pytest.mark.parametrize("F", [32])
def test_large_feature_dims(F):
    """f = 32 (D = 561 features): only one feature block lives on chip at a time."""
    q, k, v, h0 = make(1, 40, 1, F, 16, state=True)
    got = run_with_grads(triton_fn, q, k, v, h0)
    check_all(got, oracle(q, k, v, h0), TOL32)


@pytest.mark.parametrize("F", [5, 12])
def test_state_rows_are_the_symmetric_map(F):
    """The kernels' state rows are ``symmetric_feature_map``'s (1, linear, squares, then the pairs a < b in row-major
    order) at an odd f (D = 21, one feature block) and at f = 12 (D = 91: the pair rows straddle feature blocks):
    the chunked final state and a decode step's state equal sums of the explicit map in fp64."""
    from based_kernels.taylor_attention import symmetric_feature_map

    q, k, v, _ = make(1, 45, 2, F, 24)
    _, (S, z) = triton_fn(q, k, v, output_final_state=True)
    pk = symmetric_feature_map(k.double() * 1.0)  # [B, T, H, D]
    assert S.shape[2] == 1 + F + F * (F + 1) // 2 and z.shape[2] == S.shape[2]
    assert rel(S, torch.einsum("bthd,bthe->bhde", pk, v.double())) < 1e-5 and rel(z, pk.sum(1)) < 1e-5
    _, (S1, z1) = taylor_linear_attention_step(q[:, 0], k[:, 0], v[:, 0], None, backend="triton")
    assert rel(S1, pk[:, 0, :, :, None] * v[:, 0, :, None, :].double()) < 1e-6 and rel(z1, pk[:, 0]) < 1e-6
    # a state of another layout (the full map's 1 + f + f^2 rows) is refused, not read with the wrong strides
    full = (torch.zeros(1, 2, 1 + F + F * F, 24, device=DEV), torch.zeros(1, 2, 1 + F + F * F, device=DEV))
    with pytest.raises(ValueError, match="symmetric map"):
        taylor_linear_attention_step(q[:, 0], k[:, 0], v[:, 0], full, backend="triton")


@pytest.mark.parametrize("F", [5, 16])
def test_feature_table_is_the_symmetric_map(F):
    """The chunk kernels' row table (factor columns a, b and coefficient c per feature row): c x_a x_b with x_-1 = 1
    is ``symmetric_feature_map`` in fp64 (to c's fp32 rounding)."""
    from based_kernels.taylor_attention import ops, symmetric_feature_map

    tab = ops.feature_table(F, torch.device("cpu"))
    assert tab.shape == (3, 1 + F + F * (F + 1) // 2) and tab.dtype == torch.int32
    a, b, c = tab[0].long(), tab[1].long(), tab[2].view(torch.float32).double()
    x = torch.randn(7, F, dtype=torch.float64)
    x1 = torch.cat([x, torch.ones(7, 1, dtype=torch.float64)], 1)  # column -1: the constant 1
    assert torch.allclose(c * x1[:, a] * x1[:, b], symmetric_feature_map(x), rtol=1e-7, atol=0)
    assert ops.feature_table(F, torch.device("cpu")) is tab  # built once per (f, device)


@pytest.mark.parametrize("which", [0, 1])
def test_gradient_through_one_part_of_the_final_state(which):
    """A loss on only S (or only z) of the final state: the other part's gradient is zeros of the state's shape."""
    q, k, v, h0 = make(1, 50, 2, 6, 16, state=True)
    got, want = [], []
    for fn, dt, out in ((triton_fn, q.dtype, got), (taylor_attention_quadratic, torch.float64, want)):
        leaves = [t.detach().clone().to(dt).requires_grad_() for t in (q, k, v, *h0)]
        _, fin = fn(*leaves[:3], initial_state=tuple(leaves[3:]), output_final_state=True)
        (fin[which].double() * torch.linspace(-1, 1, fin[which].numel(), dtype=torch.float64,
                                              device=fin[which].device).reshape(fin[which].shape)).sum().backward()
        out += [torch.zeros_like(t) if t.grad is None else t.grad for t in leaves]  # None: not on the loss's path
    for name, a, b in zip(("q", "k", "v", "S0", "z0"), got, want):
        assert rel(a, b) < TOL32 if b.abs().max() > 0 else a.abs().max() == 0, (name, rel(a, b))


def test_varlen():
    """Documents of length 1, ones crossing chunk boundaries (32, 64 and 96 in the interpreter), per-document initial
    and final states."""
    cu = torch.tensor([0, 1, 35, 70, 71, 100], dtype=torch.int32, device=DEV)
    q, k, v, h0 = make(1, 100, 2, 16, 32, state=True, n_states=5)
    got = run_with_grads(triton_fn, q, k, v, h0, cu_seqlens=cu)
    want = oracle(q, k, v, h0, cu_seqlens=cu)
    check_all(got, want, TOL32)
    # documents really are independent: perturbing document 2 leaves the others unchanged
    k2 = k.clone()
    k2[:, 35:70] += 1.0
    y2, _ = triton_fn(q, k2, v, cu_seqlens=cu)
    y1, _ = triton_fn(q, k, v, cu_seqlens=cu)
    assert torch.equal(y1[:, :35], y2[:, :35]) and torch.equal(y1[:, 70:], y2[:, 70:])
    assert not torch.equal(y1[:, 35:70], y2[:, 35:70])


@pytest.mark.parametrize("t", [1, 77])
def test_initial_state_continuation(t):
    """[0, T) in one call equals [0, t) then [t, T) with the carried state."""
    q, k, v, _ = make(2, 130, 2, 16, 32)
    y, (S, z) = triton_fn(q, k, v, output_final_state=True)
    ya, st = triton_fn(q[:, :t], k[:, :t], v[:, :t], output_final_state=True)
    yb, (S2, z2) = triton_fn(q[:, t:], k[:, t:], v[:, t:], initial_state=st, output_final_state=True)
    tol = 1e-5 if DEV == "cpu" else 1e-3
    assert rel(torch.cat([ya, yb], 1), y) < tol
    assert rel(S2, S) < tol and rel(z2, z) < tol


def test_strided_views_are_not_copied():
    """The mixer's layout: [s, b, h*f] activations viewed as [b, s, h, f]."""
    T, B, H, F, DV = 70, 2, 2, 16, 32
    g = torch.Generator().manual_seed(3)
    qkv = torch.randn(T, B, H * (2 * F + DV), generator=g).to(DEV)
    q = qkv[..., : H * F].view(T, B, H, F).transpose(0, 1)
    k = qkv[..., H * F: 2 * H * F].view(T, B, H, F).transpose(0, 1)
    v = qkv[..., 2 * H * F:].view(T, B, H, DV).transpose(0, 1)
    assert not q.is_contiguous()
    assert ops.lastdim_contiguous(q).data_ptr() == q.data_ptr()
    y, _ = triton_fn(q, k, v)
    y_c, _ = triton_fn(q.contiguous(), k.contiguous(), v.contiguous())
    assert torch.equal(y, y_c)
    assert rel(y, taylor_attention_quadratic(q.double(), k.double(), v.double())[0]) < TOL32


def test_step_kernel_and_prefill_then_decode():
    B, T, H, F, DV, P = 2, 70, 2, 16, 40, 65
    q, k, v, _ = make(B, T, H, F, DV)
    y_full, _ = taylor_attention_quadratic(q.double(), k.double(), v.double())
    _, st = triton_fn(q[:, :P], k[:, :P], v[:, :P], output_final_state=True)
    st_in = tuple(s.clone() for s in st)
    ys = []
    for t in range(P, T):
        y_t, st_new = taylor_linear_attention_step(q[:, t], k[:, t], v[:, t], st, backend="triton")
        y_r, st_r = taylor_attention_step(q[:, t], k[:, t], v[:, t], st)
        assert rel(y_t, y_r) < 1e-5 and rel(st_new[0], st_r[0]) < 1e-6 and rel(st_new[1], st_r[1]) < 1e-6
        ys.append(y_t)
        st = st_new
    assert rel(torch.stack(ys, 1), y_full[:, P:]) < TOL32
    # the caller's state is not modified, and an empty state works
    _, st0 = triton_fn(q[:, :P], k[:, :P], v[:, :P], output_final_state=True)
    assert torch.equal(st0[0], st_in[0])
    y0, _ = taylor_linear_attention_step(q[:, 0], k[:, 0], v[:, 0], None, backend="triton")
    assert rel(y0, taylor_attention_step(q[:, 0], k[:, 0], v[:, 0], None)[0]) < 1e-5


@pytest.mark.parametrize("backend", ["triton", "torch"])
@pytest.mark.parametrize("DV", [80, 200])
def test_step_inplace(backend, DV):
    """inplace=True updates the caller's (S, z) buffers and equals the out-of-place step bitwise; d_v 80 and 200
    are two and four value blocks (in place one program per (batch, head) walks them all, updating z once;
    out of place one program per block), the last one masked."""
    B, H, F = 2, 3, 16
    q, k, v, h0 = make(B, 3, H, F, DV, state=True)
    S, z = (t.clone() for t in h0)
    ptrs = (S.data_ptr(), z.data_ptr())
    st = h0
    for t in range(3):
        y_ref, st = taylor_linear_attention_step(q[:, t], k[:, t], v[:, t], st, backend=backend)
        y, (S2, z2) = taylor_linear_attention_step(q[:, t], k[:, t], v[:, t], (S, z), backend=backend,
                                                   inplace=True)
        assert (S2.data_ptr(), z2.data_ptr()) == ptrs
        assert torch.equal(y, y_ref) and torch.equal(S, st[0]) and torch.equal(z, st[1])
    with pytest.raises(ValueError, match="inplace"):
        taylor_linear_attention_step(q[:, 0], k[:, 0], v[:, 0], None, backend=backend, inplace=True)


@pytest.mark.parametrize("tiles", [(16, 4, 4), (64, 8, 8)])
def test_step_inplace_launch_configs(tiles, monkeypatch):
    """The in-place step's tile alternatives benchmarks/decode_kernels.py times through ``ops.STEP_INPLACE`` (BV 16:
    five value blocks of d_v 80, the last masked; BV 64: two): bitwise the out-of-place step, outputs and state."""
    monkeypatch.setattr(ops, "STEP_INPLACE", tiles)
    B, H, F, DV = 2, 3, 16, 80
    q, k, v, h0 = make(B, 3, H, F, DV, state=True)
    S, z = (t.clone() for t in h0)
    st = h0
    for t in range(3):
        y_ref, st = taylor_linear_attention_step(q[:, t], k[:, t], v[:, t], st, backend="triton")
        y, _ = taylor_linear_attention_step(q[:, t], k[:, t], v[:, t], (S, z), backend="triton", inplace=True)
        assert torch.equal(y, y_ref) and torch.equal(S, st[0]) and torch.equal(z, st[1])


def _buffered_decode(q, k, v, h0, C, backend, copy_dtype=None):
    """Decode every token of q, k, v ``[B, T, H, *]`` from the state h0 with a buffer of C tokens, in place (and a
    ``copy_dtype`` copy of the state's quadratic rows); returns the outputs ``[B, T, H, d_v]``, the state, the
    buffer and the fill count seen before each step."""
    B, T, H, F = q.shape
    S, z = (t.clone() for t in h0)
    kb = torch.zeros(B, H, C, F, dtype=k.dtype, device=q.device)
    vb = torch.zeros(B, H, C, v.shape[-1], dtype=v.dtype, device=q.device)
    n = torch.zeros(B, H, dtype=torch.int32, device=q.device)
    buffer = (kb, vb, n) if copy_dtype is None else (kb, vb, n, S[:, :, 1 + F:].to(copy_dtype))
    ys, counts = [], []
    for t in range(T):
        counts.append(n.clone())
        y, st = taylor_linear_attention_step(q[:, t], k[:, t], v[:, t], (S, z), backend=backend, inplace=True,
                                             buffer=buffer)
        assert st[0] is S and st[1] is z
        ys.append(y)
    return torch.stack(ys, 1), (S, z), buffer, counts


@pytest.mark.parametrize("backend", ["triton", "torch"])
@pytest.mark.parametrize("F,DV,C", [(16, 80, 4), (5, 40, 1), (7, 24, 17), (1, 16, 2), (2, 24, 3)])
def test_step_buffered_equals_the_fp64_oracle(backend, F, DV, C):
    """The buffered decode step (up to C tokens kept unexpanded, folded into the state when the buffer is full):
    every output against the quadratic fp64 oracle, the state with its buffer against the fp64 final state, and
    the buffer's fill cycling 0..C (odd f, d_v 80 = three value blocks of 32 with the last masked, C 17 > 16
    rows of a tile, C 1 = a fold every other token; f 1 and 2: the kernel's second row tile of 1 and 2 rows). T: two
    folds and then about half a buffer (C 17: one fold and 5 tokens); 2 heads of 2 sequences."""
    B, T, H = 2, min(23, 2 * (C + 1) + C // 2 + 1), 2
    q, k, v, h0 = make(B, T, H, F, DV, state=True)
    y, st, buf, counts = _buffered_decode(q, k, v, h0, C, backend)
    want, (S_want, z_want) = taylor_attention_quadratic(q.double(), k.double(), v.double(),
                                                        initial_state=tuple(t.double() for t in h0),
                                                        output_final_state=True)
    assert rel(y, want) < 2e-6
    S_full, z_full = taylor_state_with_buffer(tuple(t.double() for t in st), buf)
    assert rel(S_full, S_want) < 2e-6 and rel(z_full, z_want) < 2e-6
    assert [int(c[0, 0]) for c in counts] == [t % (C + 1) for t in range(T)]
    assert all(torch.equal(c, c[0, 0].expand_as(c)) for c in counts)
    # the rows still buffered are the last tokens' k and v as given
    m = T % (C + 1)
    assert torch.equal(buf[0][:, :, :m], k[:, T - m:].transpose(1, 2)) and torch.equal(
        buf[1][:, :, :m], v[:, T - m:].transpose(1, 2))


def test_step_buffered_triton_equals_torch_and_unbuffered():
    """Triton and PyTorch buffered steps agree to rounding at every token and fold; the fp64 buffered reference
    equals the unbuffered fp64 step (the same function, another summation order)."""
    B, T, H, F, DV, C = 2, 11, 2, 16, 48, 3
    q, k, v, h0 = make(B, T, H, F, DV, state=True)
    y_tr, st_tr, buf_tr, _ = _buffered_decode(q, k, v, h0, C, "triton")
    y_to, st_to, buf_to, _ = _buffered_decode(q, k, v, h0, C, "torch")
    assert rel(y_tr, y_to) < 1e-6 and rel(st_tr[0], st_to[0]) < 1e-6 and rel(st_tr[1], st_to[1]) < 1e-6
    assert all(torch.equal(a, b) for a, b in zip(buf_tr, buf_to))
    q, k, v = (t.double() for t in (q, k, v))
    st = tuple(t.double() for t in h0)
    buf = (torch.zeros(B, H, C, F, dtype=torch.float64), torch.zeros(B, H, C, DV, dtype=torch.float64),
           torch.zeros(B, H, dtype=torch.int32))
    plain = st
    for t in range(T):
        y_b, st, buf = taylor_attention_step_buffered(q[:, t], k[:, t], v[:, t], st, buf)
        y_p, plain = taylor_attention_step(q[:, t], k[:, t], v[:, t], plain)
        assert rel(y_b, y_p) < 1e-13
    full = taylor_state_with_buffer(st, buf)
    assert rel(full[0], plain[0]) < 1e-13 and rel(full[1], plain[1]) < 1e-13


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_step_buffered_read_copy(backend):
    """With a bf16 copy of the state's quadratic rows (ops.STEP_READ_COPY): the fold writes it from the new fp32
    state, the steps between folds read it; outputs against the fp64 oracle within the copy's rounding, the fp32
    state itself unaffected (equal to the run without the copy), Triton and torch alike."""
    B, T, H, F, DV, C = 2, 13, 2, 7, 40, 4  # two folds, then 3 tokens buffered
    q, k, v, h0 = make(B, T, H, F, DV, state=True)
    y, st, buf, _ = _buffered_decode(q, k, v, h0, C, backend, torch.bfloat16)
    y0, st0, _, _ = _buffered_decode(q, k, v, h0, C, backend)
    want, _ = taylor_attention_quadratic(q.double(), k.double(), v.double(),
                                         initial_state=tuple(t.double() for t in h0))
    err, err0 = rel(y, want), rel(y0, want)
    assert err0 < 2e-6 and 1e-5 < err < 4e-3, (err, err0)  # bf16 rows read between folds: above fp32, below bf16 y
    assert torch.equal(st[0], st0[0]) and torch.equal(st[1], st0[1])
    # written by the last fold (T % 5 = 3); the interpreter converts to bf16 by truncation, not to nearest
    rows = st[0][:, :, 1 + F:]
    if backend == "torch" or DEV == "cuda":
        assert torch.equal(buf[3], rows.to(torch.bfloat16))
    else:
        assert rel(buf[3], rows) < 8e-3


def test_step_buffered_read_copy_triton_equals_torch():
    B, T, H, F, DV, C = 2, 11, 2, 16, 48, 3
    q, k, v, h0 = make(B, T, H, F, DV, state=True)
    y_tr, st_tr, buf_tr, _ = _buffered_decode(q, k, v, h0, C, "triton", torch.bfloat16)
    y_to, st_to, buf_to, _ = _buffered_decode(q, k, v, h0, C, "torch", torch.bfloat16)
    # the interpreter rounds to bf16 by truncation (torch and the GPU to nearest): ~1e-3 apart there
    tol = 1e-6 if DEV == "cuda" else 4e-3
    assert rel(y_tr, y_to) < tol and rel(st_tr[0], st_to[0]) < 1e-6
    assert rel(buf_tr[3], buf_to[3]) < 1e-2


def test_step_buffered_bad_buffers_are_refused():
    q, k, v, h0 = make(2, 1, 3, 16, 32, state=True)
    S, z = h0
    kb, vb = torch.zeros(2, 3, 4, 16, device=DEV), torch.zeros(2, 3, 4, 32, device=DEV)
    n = torch.zeros(2, 3, dtype=torch.int32, device=DEV)
    args = (q[:, 0], k[:, 0], v[:, 0], (S, z))
    with pytest.raises(ValueError, match="inplace=True"):
        taylor_linear_attention_step(*args, buffer=(kb, vb, n))
    with pytest.raises(ValueError, match=r"kb \[B, H, C, f\]"):
        taylor_linear_attention_step(*args, inplace=True, buffer=(kb, vb[:, :, :3], n))
    with pytest.raises(ValueError, match="int32"):
        taylor_linear_attention_step(*args, inplace=True, buffer=(kb, vb, n.long()))
    with pytest.raises(ValueError, match="sq"):
        taylor_linear_attention_step(*args, inplace=True, buffer=(kb, vb, n, torch.zeros(2, 3, 136, 32, device=DEV)))


@pytest.mark.parametrize("varlen", [False, True])
def test_grad_split_equals_one_kernel(monkeypatch, varlen):
    """ops.GRAD_SPLIT (the gradient pass as a dq kernel and a dk / dv kernel) gives bitwise the gradients of the
    one-kernel pass: several chunks, feature and value blocks, an initial state, packed documents."""
    small_tiles(monkeypatch)
    q, k, v, h0 = make(1 if varlen else 2, 45, 1, 16, 40, state=True)
    kw = dict(cu_seqlens=torch.tensor([0, 7, 45], dtype=torch.int32, device=DEV)) if varlen else {}
    h0 = None if varlen else h0
    one = run_with_grads(triton_fn, q, k, v, h0, **kw)
    monkeypatch.setattr(ops, "GRAD_SPLIT", True)
    split = run_with_grads(triton_fn, q, k, v, h0, **kw)
    assert all(torch.equal(a, b) for a, b in zip(one[2], split[2]))


@pytest.mark.parametrize("varlen", [False, True])
def test_output_query_blocks_match_fp64(monkeypatch, varlen):
    """ops.OUTPUT_QUERY_ROWS (the output pass in blocks of query rows, one program each): output, final state and
    gradients against fp64 on 32-token chunks in 16-row blocks (two per chunk), odd lengths (a last chunk whose
    second block is empty or part-filled), an initial state or packed documents, two value blocks; and the whole-
    chunk pass's results to fp32 rounding."""
    monkeypatch.setattr(ops, "INTERPRET_TILES", (32, 32, 32))
    q, k, v, h0 = make(1 if varlen else 2, 75, 2, 16, 40, state=not varlen)
    kw = dict(cu_seqlens=torch.tensor([0, 17, 50, 75], dtype=torch.int32, device=DEV)) if varlen else {}
    whole = run_with_grads(triton_fn, q, k, v, h0, **kw)
    monkeypatch.setattr(ops, "OUTPUT_QUERY_ROWS", 16)
    assert ops.output_query_rows(32) == 16 and ops.output_query_rows(16) == 0
    got = run_with_grads(triton_fn, q, k, v, h0, **kw)
    check_all(got, oracle(q, k, v, h0, **kw), TOL32)
    for a, b in zip([got[0], *got[2]], [whole[0], *whole[2]]):
        assert rel(a, b) < 1e-6, rel(a, b)


def test_output_query_blocks_confine_nan_and_bad_values(monkeypatch):
    """Query blocks keep NaN confinement (a NaN k or v of a sequence's last token reaches only its own output and
    the gradients that see it) and the confining launch's bitwise equality with the plain one; a row count that is
    no tile size is refused with the setting's name."""
    monkeypatch.setattr(ops, "OUTPUT_QUERY_ROWS", 16)
    check_confining_equals_plain(2, 70, 1, 48, torch.float32)
    for which in "kv":
        check_nan_confined(which, False, 70, 0, torch.float32)
        check_nan_confined(which, True, 70, 40, torch.float32)
    for bad in (8, 24):
        monkeypatch.setattr(ops, "OUTPUT_QUERY_ROWS", bad)
        with pytest.raises(ValueError, match="OUTPUT_QUERY_ROWS"):
            ops.output_query_rows(128)


@pytest.mark.parametrize("varlen, rows", [(False, None), (True, None), (False, 16)])
def test_output_split_matches_fp64(monkeypatch, varlen, rows):
    """ops.OUTPUT_SPLIT (the default: the output pass's state part as its own kernel, its fp32 partial sums added by
    the intra-chunk kernel): output, final state and gradients against fp64 on 32-token chunks with odd lengths (a
    part-filled last chunk), an initial state or packed documents, two value blocks and several feature blocks, also
    with query blocks (OUTPUT_QUERY_ROWS); and the one-kernel pass's results (OUTPUT_SPLIT off) to fp32 rounding,
    that pass itself against fp64."""
    monkeypatch.setattr(ops, "INTERPRET_TILES", (32, 32, 32))
    monkeypatch.setattr(ops, "OUTPUT_QUERY_ROWS", rows)
    q, k, v, h0 = make(1 if varlen else 2, 75, 2, 16, 40, state=not varlen)
    kw = dict(cu_seqlens=torch.tensor([0, 17, 50, 75], dtype=torch.int32, device=DEV)) if varlen else {}
    monkeypatch.setattr(ops, "OUTPUT_SPLIT", False)
    whole = run_with_grads(triton_fn, q, k, v, h0, **kw)
    monkeypatch.setattr(ops, "OUTPUT_SPLIT", True)
    got = run_with_grads(triton_fn, q, k, v, h0, **kw)
    want = oracle(q, k, v, h0, **kw)
    check_all(got, want, TOL32)
    check_all(whole, want, TOL32)
    for a, b in zip([got[0], *got[2]], [whole[0], *whole[2]]):
        assert rel(a, b) < 1e-6, rel(a, b)


@pytest.mark.parametrize("split", [False, True])
def test_output_split_confines_nan(monkeypatch, split):
    """The output pass with and without ops.OUTPUT_SPLIT keeps NaN confinement (a NaN k or v of a sequence's last
    token reaches only its own output and the gradients that see it) and the confining launch's bitwise equality
    with the plain one."""
    monkeypatch.setattr(ops, "OUTPUT_SPLIT", split)
    check_confining_equals_plain(2, 70, 1, 48, torch.float32)
    for which in "kv":
        check_nan_confined(which, False, 70, 0, torch.float32)
        check_nan_confined(which, True, 70, 40, torch.float32)


@pytest.mark.parametrize("varlen, groups", [(False, 3), (True, 7)])
def test_state_groups_equal_one_walk(monkeypatch, varlen, groups):
    """ops.STATE_GROUPS: the state passes' two-level walk (runs summed from zero, then walked from the initial state
    plus the earlier runs' sums), forward and backward, against fp64 (the one walk passes the same check in every
    other test): 5 chunks per sequence, documents of 1 to 60 tokens (7 runs: empty ones), initial and final states,
    two heads, several feature and value blocks."""
    small_tiles(monkeypatch)
    if varlen:
        cu = torch.tensor([0, 1, 17, 77, 80], dtype=torch.int32, device=DEV)
        q, k, v, h0 = make(1, 80, 2, 16, 24, state=True, n_states=4)
        kw = dict(cu_seqlens=cu)
    else:
        q, k, v, h0 = make(2, 75, 2, 16, 24, state=True)
        kw = {}
    monkeypatch.setattr(ops, "STATE_GROUPS", groups)
    launches = []
    spy = _Spy(ops._state_kernel, launches, lambda _, c: (c["GROUPS"], c["TOTALS"]))
    monkeypatch.setattr(ops, "_state_kernel", spy)
    got = run_with_grads(triton_fn, q, k, v, h0, **kw)
    # forward: sums + walk; backward (states kept): reverse sums + walk
    assert launches == [(groups, True), (groups, False)] * 2, launches
    check_all(got, oracle(q, k, v, h0, **kw), TOL32)


def test_state_groups_rule(monkeypatch):
    """How many runs the state passes cut each sequence into (ops.state_groups)."""
    monkeypatch.setattr(ops, "STATE_GROUP_PROGRAMS_PER_SM", 2)  # the rule at 2 programs per SM
    monkeypatch.setattr(ops, "STATE_GROUP_MIN_CHUNKS", 8)
    monkeypatch.setattr(ops, "MAX_STATE_GROUPS", 16)
    # B1 T32768 H16, 3 feature blocks, chunk 128: 48 programs, 256 chunks on 132 SMs -> 5 runs of 52 chunks
    assert ops.state_groups(48, 256, 1, 132) == 5
    assert ops.state_groups(48 * 8, 256 * 8, 8, 132) == 1  # B8 T4096: SMs already full
    assert ops.state_groups(6, 256, 1, 132) == 16  # B1 H2: at most MAX_STATE_GROUPS
    assert ops.state_groups(6, 24, 1, 132) == 3  # short sequence: runs of 8 chunks or more
    assert ops.state_groups(6, 24, 3, 132) == 1  # varlen: the average document's chunks
    monkeypatch.setattr(ops, "STATE_GROUP_PROGRAMS_PER_SM", 0)
    assert ops.state_groups(6, 256, 1, 132) == 1
    monkeypatch.setattr(ops, "STATE_GROUPS", 4)
    assert ops.state_groups(48 * 8, 256 * 8, 8, 132) == 4


def test_deterministic_backward(monkeypatch):
    small_tiles(monkeypatch)
    q, k, v, h0 = make(1, 40, 1, 16, 32, state=True)
    a = run_with_grads(triton_fn, q, k, v, h0)[2]
    b = run_with_grads(triton_fn, q, k, v, h0)[2]
    assert all(torch.equal(x, y) for x, y in zip(a, b))


def test_dispatch_and_errors():
    q, k, v, _ = make(1, 20, 1, 16, 32, device="cpu")
    y, _ = taylor_linear_attention(q, k, v)  # CPU tensors: the chunked PyTorch path
    assert torch.equal(y, taylor_attention_chunked(q, k, v)[0])
    with pytest.raises(ValueError, match="backend"):
        taylor_linear_attention(q, k, v, backend="cuda")
    qb = torch.randn(1, 20, 1, 64)
    with pytest.raises(ValueError, match="f <= 32"):
        taylor_linear_attention(qb, qb, v, backend="triton")


@pytest.mark.parametrize("varlen", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_kept_chunk_states_equal_recomputed(varlen, dtype, monkeypatch):
    """ops.KEEP_STATES: the backward reads the forward's per-chunk states instead of recomputing them; outputs,
    final state and every gradient (q, k, v, initial state) bitwise those of the recomputing backward (several
    chunks, documents, an initial state, fp32 and bf16), and the op checks (schema, fake shapes: with cu_seqlens
    the chunk count is data-dependent) hold with the states kept."""
    T = 77
    cu = torch.tensor([0, 30, T], dtype=torch.int32, device=DEV) if varlen else None
    q, k, v, h0 = make(1, T, 1, 16, 48, dtype=dtype, state=True, n_states=2 if varlen else 1)
    got = {}
    for keep in (True, False):
        monkeypatch.setattr(ops, "KEEP_STATES", keep)
        y, fin, grads = run_with_grads(triton_fn, q, k, v, h0, cu_seqlens=cu)
        got[keep] = [y, *fin, *grads]
    assert all(torch.equal(a, b) for a, b in zip(got[True], got[False]))
    args = (q.requires_grad_(), k.requires_grad_(), v.requires_grad_(), h0[0].float(), h0[1].float(), cu,
            1e-12, True, True)
    torch.library.opcheck(ops.taylor_attention_fwd, args,
                          test_utils=("test_schema", "test_faketensor", "test_autograd_registration"))


def test_custom_op_registration():
    """Fake impls and autograd registration agree with the real op (what torch.compile relies on)."""
    q, k, v, h0 = make(1, 20, 2, 16, 32, state=True)
    args = (q.requires_grad_(), k.requires_grad_(), v.requires_grad_(), h0[0].float(), h0[1].float(), None,
            1e-12, True)
    torch.library.opcheck(ops.taylor_attention_fwd, args,
                          test_utils=("test_schema", "test_faketensor", "test_autograd_registration"))

    def f(q, k, v):
        return taylor_linear_attention(q, k, v, backend="triton")[0].float().square().sum()

    compiled = torch.compile(f, backend="aot_eager", fullgraph=True)
    assert rel(compiled(q, k, v), f(q, k, v)) < 1e-6
    # the decode ops: out of place, and in place (mutates S and z, returns y)
    qs, ks, vs = (t[:, 0].detach() for t in (q, k, v))
    for op, state in ((ops.taylor_attention_step_op, h0), (ops.taylor_attention_step_inplace_op, h0)):
        torch.library.opcheck(op, (qs, ks, vs, state[0].float().clone(), state[1].float().clone(), 1e-12),
                              test_utils=("test_schema", "test_faketensor"))
    buffer = (torch.zeros(1, 2, 4, 16, device=DEV), torch.zeros(1, 2, 4, 32, device=DEV),
              torch.tensor([[1, 4]], dtype=torch.int32, device=DEV))  # one head folds, one stores
    for sq in (None, h0[0][:, :, 17:].to(torch.bfloat16)):  # without and with the copy of the quadratic rows
        torch.library.opcheck(ops.taylor_attention_step_buffered_op,
                              (qs, ks, vs, h0[0].float().clone(), h0[1].float().clone(),
                               *(t.clone() for t in buffer), sq, 1e-12), test_utils=("test_schema", "test_faketensor"))


def _quadratic_num_den(q, k, v):
    """fp64 oracle: unnormalised numerator and denominator sum_{j<=t} (1 + s + s^2/2) [v_j | 1]."""
    qh, kh, vh = (t.double().transpose(1, 2) for t in (q, k, v))
    s = qh @ kh.transpose(-1, -2) / q.shape[-1] ** 0.5
    a = (1 + s + 0.5 * s * s) * torch.ones(q.shape[1], q.shape[1], dtype=torch.bool, device=q.device).tril()
    return (a @ vh).transpose(1, 2), a.sum(-1).transpose(1, 2)  # [B, T, H, DV], [B, T, H]


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_output_normalizer_value_and_grads(backend):
    """output_normalizer=True: den equals the fp64 denominator (no eps), and gradients through y and den match
    the fp64 quadratic formula."""
    q, k, v, _ = make(2, 45, 2, 16, 24)
    leaves = [t.detach().clone().requires_grad_() for t in (q, k, v)]
    y, fin, den = taylor_linear_attention(*leaves, backend=backend, output_normalizer=True)
    assert fin is None and den.dtype == torch.float32 and den.shape == q.shape[:3]
    ref_leaves = [t.detach().double().requires_grad_() for t in (q, k, v)]
    num_r, den_r = _quadratic_num_den(*ref_leaves)
    y_r = num_r / (den_r + 1e-12).unsqueeze(-1)
    assert rel(den, den_r) < TOL32 and rel(y, y_r) < TOL32
    g = torch.Generator(device="cpu").manual_seed(3)
    wy = torch.randn(y.shape, generator=g, dtype=torch.float64).to(DEV)
    wd = torch.randn(den.shape, generator=g, dtype=torch.float64).to(DEV) * 0.1
    ((y.double() * wy).sum() + (den.double() * wd).sum()).backward()
    ((y_r * wy).sum() + (den_r * wd).sum()).backward()
    for a, b in zip(leaves, ref_leaves):
        assert rel(a.grad, b.grad) < 5 * TOL32
    # only den reaching the loss
    leaves = [t.detach().clone().requires_grad_() for t in (q, k, v)]
    _, _, den = taylor_linear_attention(*leaves, backend=backend, output_normalizer=True)
    (den.double() * wd).sum().backward()
    ref_leaves = [t.detach().double().requires_grad_() for t in (q, k, v)]
    (_quadratic_num_den(*ref_leaves)[1] * wd).sum().backward()
    for a, b in zip(leaves[:2], ref_leaves[:2]):
        assert rel(a.grad, b.grad) < 5 * TOL32
    assert leaves[2].grad is None or leaves[2].grad.abs().max() == 0


def test_output_normalizer_varlen_and_state_torch():
    """The PyTorch path with cu_seqlens and an initial state: y unchanged, den = the full denominator."""
    q, k, v, h0 = make(1, 40, 2, 16, 8, state=True, n_states=2, device="cpu")
    cu = torch.tensor([0, 17, 40])
    y0, f0 = taylor_attention_chunked(q, k, v, initial_state=h0, output_final_state=True, cu_seqlens=cu)
    y1, f1, den = taylor_linear_attention(q, k, v, initial_state=h0, output_final_state=True, cu_seqlens=cu,
                                          backend="torch", output_normalizer=True)
    assert torch.equal(y0, y1) and torch.equal(f0[0], f1[0])
    num_a, den_a = _quadratic_num_den(q[:, :17], k[:, :17], v[:, :17])
    from based_kernels.taylor_attention import symmetric_feature_map
    den_a = den_a + torch.einsum("bthd,hd->bth", symmetric_feature_map(q[:, :17].double()), h0[1][0].double())
    assert rel(den[:, :17], den_a) < TOL32


@bad_cu_seqlens
@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_bad_cu_seqlens_are_refused(bounds, message, backend):
    q, k, v, _ = make(1, 40, 1, 16, 16)
    with pytest.raises(ValueError, match=message):
        taylor_linear_attention(q, k, v, cu_seqlens=torch.tensor(bounds, device=DEV), backend=backend)
    with pytest.raises(ValueError, match=r"cu_seqlens must be a 1-D integer tensor"):
        taylor_linear_attention(q, k, v, cu_seqlens=torch.tensor([0., 40.], device=DEV), backend=backend)


def check_nan_confined(which, varlen, T, split, dtype, H=2):
    """NaN in k or v of the last token of one sequence (batch row 0 of 2, or the first of two documents ending at
    ``split``): that token's output is NaN; earlier outputs, dq of earlier tokens, dv (NaN v: dv does not depend on
    v) and everything of the other sequence equal the clean run's bit for bit."""
    q, k, v, _ = make(1 if varlen else 2, T, H, 16, 32, dtype=dtype)
    cu = torch.tensor([0, split, T], dtype=torch.int32, device=DEV) if varlen else None
    end = split if varlen else T
    row, before = (0, end - 1), (0, slice(0, end - 1))
    other = (0, slice(end, None)) if varlen else (1,)
    fn = lambda q, k, v: triton_fn(q, k, v, cu_seqlens=cu)[0]  # noqa: E731
    (y, (dq, dk, dv)), (y_, (dq_, dk_, dv_)) = clean_and_poisoned(fn, (q, k, v), "qkv".index(which), row)
    assert y_[row].isnan().all() and dq_[row].isnan().any()
    assert_equal_where(y, y_, "y", before, other)
    assert_equal_where(dq, dq_, "dq", before, other)
    assert_equal_where(dk, dk_, "dk", other)
    assert_equal_where(dv, dv_, "dv", (0, slice(0, end)) if which == "v" else other, other)


@pytest.mark.parametrize("which", ["k", "v"])
@pytest.mark.parametrize("varlen", [False, True])
def test_nan_reaches_only_the_outputs_that_see_it(which, varlen):
    # two 32-token chunks before the NaN; one head (the NaN is in every head of its token: more heads would check
    # nothing more)
    check_nan_confined(which, varlen, 70, 40, torch.float32, H=1)


# ---------------------------------------------------------------------------------------------------------
# GPU only: long sequences in bf16


def long_case(T, dtype=torch.bfloat16, scale=1.0, H=2, DV=64):
    B = 1
    q, k, v, _ = make(B, T, H, 16, DV, dtype=dtype, scale=scale)
    y, fin, grads = run_with_grads(triton_fn, q, k, v, None)
    # fp64 oracle: the chunked form (equal to the quadratic one to 1e-14, and O(T) in memory)
    ref = lambda *a, **kw: taylor_attention_chunked(*a, **kw)  # noqa: E731
    y_r, fin_r, grads_r = run_with_grads(ref, *(t.double() for t in (q, k, v)), None)
    return ([rel(y, y_r), rel(fin[0], fin_r[0])] + [rel(a, b) for a, b in zip(grads, grads_r)],
            [y] + grads)


@pytest.mark.gpu
def test_long_context_bf16_error_bounded_and_flat():
    errs = {T: long_case(T)[0] for T in (1024, 4096, 16384, 32768)}
    for T, (ey, es, edq, edk, edv) in errs.items():
        assert ey <= 2e-3, (T, ey)
        assert es <= 2e-3, (T, es)
        # bf16 dq, dk, dv (rounding alone ~1.6e-3) from bf16-operand products: 3.0e-3..4.2e-3 measured on an H100
        assert max(edq, edk, edv) <= 5e-3, (T, edq, edk, edv)
    for i in range(5):
        assert errs[32768][i] <= 1.5 * errs[1024][i] + 2e-4, ("error grows with T", i, errs)


@pytest.mark.gpu
def test_more_chunks_than_a_grid_axis_holds():
    """65,537 chunks in one call (8.4M tokens at chunk 128; CUDA's second and third grid axes take 65,535 programs;
    d_v 80: two value blocks folded with the chunks): output, final state and gradients equal the same tokens in two
    calls of fewer chunks with the state carried between them. A wrong chunk, value block or head would be O(1)
    off; the two ways differ by their bf16 rounding (each ~2e-3 / 3e-3 from fp64 at shorter lengths)."""
    T, t = 65536 * 128 + 77, 32768 * 128 + 5
    gen = torch.Generator(device=DEV).manual_seed(11)
    q, k = (torch.randn(1, T, 1, 16, device=DEV, generator=gen, dtype=torch.bfloat16) for _ in range(2))
    v, dy = (torch.randn(1, T, 1, 80, device=DEV, generator=gen, dtype=torch.bfloat16) for _ in range(2))

    def run(parts):
        leaves = [x.detach().requires_grad_() for x in (q, k, v)]
        ys, st = [], None
        for a, b in parts:
            y, st = triton_fn(*(x[:, a:b] for x in leaves), initial_state=st, output_final_state=True)
            ys.append(y)
        y = torch.cat(ys, 1)
        y.backward(dy)
        return [y.detach(), st[0].detach()] + [x.grad for x in leaves]

    whole = run([(0, T)])
    halves = run([(0, t), (t, T)])
    for name, a, b in zip(("y", "S", "dq", "dk", "dv"), whole, halves):
        err = ((a.float() - b.float()).norm() / b.float().norm()).item()
        assert err < 1e-2, (name, err)


@pytest.mark.gpu
def test_fp32_is_fp32_accurate_at_default_precision(f32_precision):
    """fp32 q, k, v at torch's default float32 matmul precision ("highest": IEEE products): within 1e-5 of fp64
    (output, final states and every gradient) on packed documents of odd lengths (1, 399 and 1600 tokens: many
    128-token chunks), each starting from its own state. One case: the plain layout runs the same chunk code, "high"
    launches the same IEEE kernels and "medium" the tf32 ones, as the CPU tests check; each precision x layout is
    one more compilation of the Taylor kernels, and the GPU suite has a time budget."""
    ref = lambda *a, **kw: taylor_attention_chunked(*a, **kw)  # noqa: E731
    cu = torch.tensor([0, 1, 400, 2000], dtype=torch.int32, device=DEV)
    f32_precision("highest")
    q, k, v, h0 = make(1, 2000, 4, 16, 64, state=True, n_states=3)
    want = run_with_grads(ref, *(t.double() for t in (q, k, v)), tuple(t.double() for t in h0), cu_seqlens=cu)
    got = run_with_grads(triton_fn, q, k, v, h0, cu_seqlens=cu)
    check_all(got, want, 1e-5)


@pytest.mark.gpu
def test_grad_split_at_model_size(monkeypatch):
    """The split gradient pass (ops.GRAD_SPLIT) compiled, at T 4096 bf16: the same gradients as the one-kernel
    pass, to bf16 rounding (the two compiled kernels may order their fp32 sums differently)."""
    q, k, v, _ = make(1, 4096, 4, 16, 64, dtype=torch.bfloat16)
    one = run_with_grads(triton_fn, q, k, v, None)
    monkeypatch.setattr(ops, "GRAD_SPLIT", True)
    split = run_with_grads(triton_fn, q, k, v, None)
    for a, b in zip(one[2], split[2]):
        assert rel(a, b) < 2e-3, rel(a, b)


@pytest.mark.gpu
@pytest.mark.parametrize("DV, grad", [(32, None), (64, (32, 32, 4, 1))])
def test_grad_split_at_32_value_columns(monkeypatch, DV, grad):
    """ops.GRAD_SPLIT at value blocks of 32 columns (d_v 32, or BV 32 tiles at d_v 64): the library runs the
    one-kernel pass there (ops.grad_split: split dk / dv were wrong on an H100); gradients against fp64."""
    monkeypatch.setattr(ops, "GRAD_SPLIT", True)
    if grad:
        monkeypatch.setitem(ops.CONFIG, "grad", grad)
    errs, _ = long_case(4096, H=4, DV=DV)
    assert errs[0] <= 2e-3 and max(errs[2:]) <= 5e-3, errs


@pytest.mark.gpu
@pytest.mark.parametrize("rows", [32, 64])
def test_output_query_blocks_bf16(monkeypatch, rows):
    """ops.OUTPUT_QUERY_ROWS compiled at chunk 128, bf16: T 4096, and packed documents of odd lengths with states,
    against fp64 within the whole-chunk pass's bounds."""
    monkeypatch.setattr(ops, "OUTPUT_QUERY_ROWS", rows)
    ey, es, *egrads = long_case(4096, H=4)[0]
    assert ey <= 2e-3 and es <= 2e-3 and max(egrads) <= 5e-3, (ey, es, egrads)
    cu = torch.tensor([0, 1, 300, 2001], dtype=torch.int32, device=DEV)
    q, k, v, h0 = make(1, 2001, 2, 16, 64, dtype=torch.bfloat16, state=True, n_states=3)
    got = run_with_grads(triton_fn, q, k, v, h0, cu_seqlens=cu)
    ref = lambda *a, **kw: taylor_attention_chunked(*a, **kw)  # noqa: E731
    want = run_with_grads(ref, *(t.double() for t in (q, k, v)), tuple(t.double() for t in h0), cu_seqlens=cu)
    check_all(got, want, 2e-3, 4e-3)


@pytest.mark.gpu
@pytest.mark.parametrize("split, rows", [(True, None), (True, 64), (False, None)])
def test_output_split_bf16(monkeypatch, split, rows):
    """The output pass with and without ops.OUTPUT_SPLIT compiled at chunk 128, bf16 (also with query blocks): T
    4096, d_v 128 (two value blocks), and packed documents of odd lengths with states, against fp64."""
    monkeypatch.setattr(ops, "OUTPUT_SPLIT", split)
    monkeypatch.setattr(ops, "OUTPUT_QUERY_ROWS", rows)
    ey, es, *egrads = long_case(4096, H=4)[0]
    assert ey <= 2e-3 and es <= 2e-3 and max(egrads) <= 5e-3, (ey, es, egrads)
    errs, _ = long_case(2048, DV=128)
    assert errs[0] <= 2e-3 and max(errs[2:]) <= 4e-3, errs
    cu = torch.tensor([0, 1, 300, 2001], dtype=torch.int32, device=DEV)
    q, k, v, h0 = make(1, 2001, 2, 16, 64, dtype=torch.bfloat16, state=True, n_states=3)
    got = run_with_grads(triton_fn, q, k, v, h0, cu_seqlens=cu)
    ref = lambda *a, **kw: taylor_attention_chunked(*a, **kw)  # noqa: E731
    want = run_with_grads(ref, *(t.double() for t in (q, k, v)), tuple(t.double() for t in h0), cu_seqlens=cu)
    check_all(got, want, 2e-3, 4e-3)


# The Taylor kernels at small heads (f 8: 45 features in one block, d_v 32) and at the model's (f 16, d_v 64), with
# packed documents (and whole sequences at the model's), bf16 (and fp32 at f 8), forward with the final state and
# backward: one process, run under compute-sanitizer's memcheck by the test below (an out-of-bounds read there does
# not always fault without it).
_MEMCHECK_SCRIPT = """
import torch
from based_kernels.taylor_attention import taylor_linear_attention
g = torch.Generator(device="cuda").manual_seed(0)
packed = torch.tensor([0, 3, 15, 24], device="cuda", dtype=torch.int32)
bf16, fp32 = torch.bfloat16, torch.float32
# d_v 16: value blocks of 16 columns, the other place where the passes' products have 16 columns
for F, DV, dt, cu in ((8, 32, bf16, packed), (8, 64, bf16, packed), (8, 32, fp32, packed), (16, 32, bf16, packed),
                      (16, 64, bf16, packed), (16, 64, bf16, None), (8, 16, bf16, packed), (16, 16, bf16, None)):
    mk = lambda d: torch.randn(1, 24, 4, d, device="cuda", generator=g, dtype=dt).requires_grad_()
    q, k, v = mk(F), mk(F), mk(DV)
    y, (S, z) = taylor_linear_attention(q, k, v, cu_seqlens=cu, output_final_state=True)
    (y.float().sum() + S.sum()).backward()
torch.cuda.synchronize()
print("memcheck script done")
"""


@pytest.mark.gpu
def test_kernels_under_memcheck():
    """The output pass at 8 warps read shared memory out of bounds at f 8, d_v 32 with packed documents and the final
    state on an H100 (compute-sanitizer: "Invalid __shared__ read of size 1024 bytes" in taylor_chunk_output_kernel;
    without memcheck an illegal memory access in some runs, in the fp32-residual decode test's prefill; the library
    runs it at 4 warps there, ops.OUTPUT_NARROW_WARPS). The Taylor passes at that shape and its neighbours, in a
    subprocess under memcheck: no error. Skips without compute-sanitizer."""
    assert_memcheck_clean(_MEMCHECK_SCRIPT)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype, tol", [(torch.bfloat16, 4e-3), (torch.float32, 1e-5)])
def test_small_heads_packed_documents(dtype, tol):
    """f 8, d_v 32 (the decode tests' model), packed documents of 3, 12 and 9 tokens with the final state: output,
    final state and gradients against fp64 (the shape whose output pass read shared memory out of bounds)."""
    cu = torch.tensor([0, 3, 15, 24], dtype=torch.int32, device=DEV)
    q, k, v, _ = make(1, 24, 4, 8, 32, dtype=dtype)
    got = run_with_grads(triton_fn, q, k, v, None, cu_seqlens=cu)
    ref = lambda *a, **kw: taylor_attention_chunked(*a, **kw)  # noqa: E731
    want = run_with_grads(ref, *(t.double() for t in (q, k, v)), None, cu_seqlens=cu)
    check_all(got, want, tol, 5e-3 if dtype == torch.bfloat16 else tol)


@pytest.mark.gpu
def test_chunk_64_bf16(monkeypatch):
    """ops.CHUNK = 64 alone, the gradient tiles left at the default (8 warps, which crash at chunk 64 on an H100):
    the library launches the 4-warp pass there (ops.grad_warps); output and gradients against fp64 at T 4096."""
    monkeypatch.setattr(ops, "CHUNK", 64)
    assert ops.CONFIG["grad"][2] > ops.GRAD_WARPS_SMALL_CHUNK == ops.grad_warps(64, ops.CONFIG["grad"][2])
    ey, es, *egrads = long_case(4096, H=4)[0]
    assert ey <= 2e-3 and es <= 2e-3 and max(egrads) <= 5e-3, (ey, es, egrads)


@pytest.mark.gpu
def test_large_norm_inputs_stay_finite():
    errs, outs = long_case(8192, scale=8.0)
    assert all(torch.isfinite(t).all() for t in outs)
    assert errs[0] <= 4e-3 and max(errs[2:]) <= 1e-2, errs


@pytest.mark.gpu
@pytest.mark.parametrize("DV", [32, 256])  # 64 runs in every other GPU test
def test_value_dims_bf16(DV):
    errs, _ = long_case(2048, DV=DV)
    assert errs[0] <= 2e-3 and max(errs[2:]) <= 4e-3, errs


@pytest.mark.gpu
def test_varlen_and_states_bf16():
    cu = torch.tensor([0, 1, 3000, 3001, 9000], dtype=torch.int32, device=DEV)
    q, k, v, h0 = make(1, 9000, 2, 16, 64, dtype=torch.bfloat16, state=True, n_states=4)
    got = run_with_grads(triton_fn, q, k, v, h0, cu_seqlens=cu)
    ref = lambda *a, **kw: taylor_attention_chunked(*a, **kw)  # noqa: E731
    want = run_with_grads(ref, *(t.double() for t in (q, k, v)), tuple(t.double() for t in h0), cu_seqlens=cu)
    check_all(got, want, 2e-3, 4e-3)
    q, k, v, h0 = make(2, 5000, 2, 16, 64, dtype=torch.bfloat16, state=True)
    got = run_with_grads(triton_fn, q, k, v, h0)
    want = run_with_grads(ref, *(t.double() for t in (q, k, v)), tuple(t.double() for t in h0))
    check_all(got, want, 2e-3, 4e-3)


@pytest.mark.gpu
@pytest.mark.parametrize("which", ["k", "v"])
@pytest.mark.parametrize("varlen", [False, True])
def test_nan_reaches_only_the_outputs_that_see_it_bf16(which, varlen):
    check_nan_confined(which, varlen, 300, 170, torch.bfloat16)  # 128-token chunks: two before the NaN


@pytest.mark.gpu
def test_confining_launch_equals_plain_bf16():
    check_confining_equals_plain(2, 1000, 4, 64, torch.bfloat16)
    check_confining_equals_plain(1, 3000, 2, 64, torch.bfloat16, cu=torch.tensor([0, 1, 1700, 3000], device=DEV))


@pytest.mark.gpu
def test_step_buffered_bf16_at_decode_shapes():
    """based-1.3b's decode shapes (16 heads, f 16, d_v 112: four value blocks of 32, the last masked), bf16 inputs
    and buffer, ops.STEP_BUFFER tokens: 40 tokens from a prefilled state (two folds) against the fp64 oracle, and
    against the unbuffered in-place step (the same fp32 arithmetic in another order); then with the bf16 read copy
    of the state's quadratic rows."""
    B, T, H, F, DV, C = 8, 40, 16, 16, 112, ops.STEP_BUFFER
    q, k, v, h0 = make(B, T, H, F, DV, dtype=torch.bfloat16, state=True)
    y, st, buf, counts = _buffered_decode(q, k, v, h0, C, "triton")
    S, z = (t.clone() for t in h0)
    plain = torch.stack([taylor_linear_attention_step(q[:, t], k[:, t], v[:, t], (S, z), inplace=True)[0]
                         for t in range(T)], 1)
    want, (S_want, _) = taylor_attention_quadratic(q.double(), k.double(), v.double(),
                                                   initial_state=tuple(t.double() for t in h0),
                                                   output_final_state=True)
    assert rel(y, want) < 4e-3 and rel(plain, want) < 4e-3  # bf16 output rounding
    assert rel(y, plain) < 2e-3
    assert rel(taylor_state_with_buffer(tuple(t.double() for t in st), buf)[0], S_want) < 1e-5
    assert [int(c[0, 0]) for c in counts] == [t % (C + 1) for t in range(T)]
    # with the bf16 read copy of the quadratic rows (ops.STEP_READ_COPY): the same fp32 state, y at bf16 level
    y_c, st_c, buf_c, _ = _buffered_decode(q, k, v, h0, C, "triton", torch.bfloat16)
    assert torch.equal(st_c[0], st[0]) and rel(y_c, want) < 4e-3 and rel(y_c, y) < 4e-3
    assert torch.equal(buf_c[3], st_c[0][:, :, 1 + F:].to(torch.bfloat16))
