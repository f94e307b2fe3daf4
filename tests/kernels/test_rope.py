"""Fused RoPE + q/k/v split (based_kernels.rope_split_qkv) against an fp64 rotate-half RoPE written here (a complex
rotation of the pairs (i, i + d/2)): q, k, v and the packed gradient dqkv under random dq, dk, dv given as strided
views; odd shapes (s 37, b 2, 3 groups, G 1 and 2, d_h 16 and 24), positions from 0 and 1000, fp32 and fp16, both
backends; per-token positions (ragged, to ~1M; bitwise the offset path where they agree); equality with Megatron's
split + apply_rotary_pos_emb; the cos / sin tables; input errors; custom ops and torch.compile. CPU runs the kernels under TRITON_INTERPRET=1; bf16 at the model's size is marked gpu."""
import types

import pytest
import torch
from megatron.core.models.common.embeddings.rope_utils import apply_rotary_pos_emb

from based_kernels import rope_split_qkv
from based_kernels.rope import ops
from megatron_based.model.rope import rope_freqs

from ..distributed import run_distributed

DEV = "cuda" if torch.cuda.is_available() else "cpu"
BACKENDS = ["triton", "torch"]
forked_cpu = pytest.mark.skipif(torch.cuda.is_available(), reason="forked CPU workers, kernels under the interpreter")


def rel(a, b):
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm()).item()


def rope64(x, positions, base=10000.0, sign=1):
    """fp64 RoPE of ``x [s, ..., d]`` at ``positions [s]`` (or per token ``[s, b]``): pairs (i, i + d/2) rotated by
    ``sign * angle``."""
    d = x.shape[-1]
    inv = base ** (-torch.arange(0, d, 2, dtype=torch.float64, device=x.device) / d)
    ang = sign * positions.double().unsqueeze(-1) * inv
    ang = ang.view(*ang.shape[:-1], *([1] * (x.dim() - ang.dim())), d // 2)
    x = x.double()
    z = torch.complex(x[..., : d // 2], x[..., d // 2 :]) * torch.polar(torch.ones_like(ang), ang)
    return torch.cat([z.real, z.imag], dim=-1)


def make_qkv(s, b, ng, G, D, dtype, seed=0):
    """qkv [s, b, ng, (G + 2) * D] as a column slice of a wider, batch-major buffer: last dim contiguous, every
    other stride unusual."""
    g = torch.Generator().manual_seed(seed)
    W = (G + 2) * D
    buf = torch.randn(b, s, ng, W + 8, generator=g).to(DEV, dtype)
    return buf.transpose(0, 1)[..., 4 : 4 + W]


def strided_grads(s, b, ng, G, D, dtype, seed=1):
    """dq [s, b, ng * G, D], dk, dv [s, b, ng, D] as the SWA op returns them (views of batch-major buffers), dv a
    slice of a wider one."""
    g = torch.Generator().manual_seed(seed)
    dq = torch.randn(b, s, ng * G, D, generator=g).to(DEV, dtype).transpose(0, 1)
    dk = torch.randn(b, s, ng, D, generator=g).to(DEV, dtype).transpose(0, 1)
    dv = torch.randn(s, b, ng, 2 * D, generator=g).to(DEV, dtype)[..., D:]
    return dq, dk, dv


def reference(qkv, dq, dk, dv, G, D, offset, positions=None):
    """fp64 q, k, v and dqkv from the same (rounded) inputs, at positions ``offset + t`` or ``positions [s, b]``."""
    s, b, ng, _ = qkv.shape
    pos = torch.arange(offset, offset + s, device=qkv.device) if positions is None else positions
    x = qkv.double().unflatten(-1, (G + 2, D))
    q = rope64(x[:, :, :, :G], pos).reshape(s, b, ng * G, D)
    k, v = rope64(x[:, :, :, G], pos), x[:, :, :, G + 1]
    dx = torch.cat([rope64(dq.unflatten(2, (ng, G)), pos, sign=-1), rope64(dk, pos, sign=-1)[:, :, :, None],
                    dv.double()[:, :, :, None]], dim=3)
    return q, k, v, dx.flatten(3)


def run(qkv, dq, dk, dv, ng, D, **kw):
    x = qkv.detach().requires_grad_()
    q, k, v = rope_split_qkv(x, ng, D, **kw)
    (dx,) = torch.autograd.grad((q, k, v), x, (dq, dk, dv))
    return q, k, v, dx


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype, tol", [(torch.float32, 2e-7), (torch.float16, 6e-4)])
@pytest.mark.parametrize("G, D", [(1, 16), (2, 24)])
@pytest.mark.parametrize("offset", [0, 1000])
def test_matches_fp64(backend, dtype, tol, G, D, offset):
    s, b, ng = 37, 2, 3
    qkv = make_qkv(s, b, ng, G, D, dtype)
    dq, dk, dv = strided_grads(s, b, ng, G, D, dtype)
    q, k, v, dx = run(qkv, dq, dk, dv, ng, D, offset=offset, backend=backend)
    q_ref, k_ref, v_ref, dx_ref = reference(qkv, dq, dk, dv, G, D, offset)
    assert q.shape == (s, b, ng * G, D) and k.shape == v.shape == (s, b, ng, D) and dx.shape == qkv.shape
    assert all(t.dtype == dtype and t.is_contiguous() for t in (q, k, v, dx))
    # fp32: a few roundings of fp32 math (the angles themselves are exact to fp32); fp16: the output's rounding
    assert rel(q, q_ref) < tol and rel(k, k_ref) < tol and rel(dx, dx_ref) < tol, (
        rel(q, q_ref), rel(k, k_ref), rel(dx, dx_ref))
    assert torch.equal(v, qkv[..., (G + 1) * D :]) and torch.equal(dx[..., (G + 1) * D :], dv)  # copies, bitwise


@pytest.mark.parametrize("backend", BACKENDS)
def test_flat_input_and_backends_agree(backend):
    """The flat [s, b, ng * (G + 2) * D] linear output gives the same as its 4-D view; Triton == PyTorch path."""
    s, b, ng, G, D = 37, 2, 3, 2, 16
    qkv = make_qkv(s, b, ng, G, D, torch.float32, seed=3).contiguous()
    dq, dk, dv = strided_grads(s, b, ng, G, D, torch.float32, seed=4)
    got = run(qkv.flatten(2), dq, dk, dv, ng, D, offset=5, backend=backend)
    ref = run(qkv, dq, dk, dv, ng, D, offset=5, backend="torch")
    assert got[3].shape == (s, b, ng * (G + 2) * D)
    for a, c in zip(got, ref):
        assert (a.reshape(c.shape) - c).abs().max().item() < 1e-6


def megatron_path(qkv, ng, G, D, freqs):
    """Megatron's SelfAttention: split [G*D, D, D] per group, query -> [s, b, ng*G, D], apply_rotary_pos_emb."""
    cfg = types.SimpleNamespace(apply_rope_fusion=False, rotary_interleaved=False)
    q, k, v = torch.split(qkv, [G * D, D, D], dim=3)
    q = q.reshape(q.shape[0], q.shape[1], -1, D)
    cp = object()  # bshd format: the CP group is not used, only checked for None
    return apply_rotary_pos_emb(q, freqs, cfg, cp_group=cp), apply_rotary_pos_emb(k, freqs, cfg, cp_group=cp), v


@pytest.mark.parametrize("G", [1, 2])
@pytest.mark.parametrize("offset", [0, 1000])
def test_equals_megatron_apply_rotary_pos_emb(G, offset):
    """Forward and gradient equal Megatron's split + apply_rotary_pos_emb (fp32, Triton path): to fp32 rounding
    with fp64 angles given to Megatron's helper; within the rounding of Megatron's fp32 angles (up to ~ulp(pos)
    rad) with rope_freqs as the mixers pass them."""
    s, b, ng, D = 37, 2, 3, 24
    qkv = make_qkv(s, b, ng, G, D, torch.float32, seed=5)
    dq, dk, dv = strided_grads(s, b, ng, G, D, torch.float32, seed=6)
    got = run(qkv, dq, dk, dv, ng, D, offset=offset, backend="triton")
    pos = torch.arange(offset, offset + s, dtype=torch.float64, device=DEV)
    inv = 10000.0 ** (-torch.arange(0, D, 2, dtype=torch.float64, device=DEV) / D)
    f64 = (pos[:, None] * inv).repeat(1, 2)[:, None, None, :]
    for freqs, tol in ((f64, 1e-6), (rope_freqs(s, D, 10000.0, offset, device=DEV), 2e-5 + 1e-7 * offset)):
        x = qkv.detach().double().requires_grad_()
        ref = megatron_path(x, ng, G, D, freqs)
        (dx,) = torch.autograd.grad(ref, x, (dq.double(), dk.double(), dv.double()))
        for a, c in zip(got, (*ref, dx)):
            assert (a - c).abs().max().item() < tol * c.abs().max().item(), (tol, (a - c).abs().max().item())


def ragged_positions(s, b, seed=11):
    """[s, b] int64 positions as prefill and decode pass them: each batch row its own, from 0 to past 128k."""
    g = torch.Generator().manual_seed(seed)
    start = torch.tensor([0, 1, 4093, 131_000, 1_000_003])[torch.arange(b) % 5]
    return (start[None, :] + torch.arange(s)[:, None] * torch.randint(1, 3, (1, b), generator=g)).to(DEV)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype, tol", [(torch.float32, 2e-7), (torch.float16, 6e-4)])
@pytest.mark.parametrize("G, D", [(1, 16), (2, 24)])
def test_positions_match_fp64(backend, dtype, tol, G, D):
    """Per-token positions [s, b] (ragged, up to ~1M): q, k and dqkv vs fp64 with the same positions, v and dv
    bitwise; a decode-shaped call (s 1) and a packed-prefill-shaped one (b 1) too."""
    for s, b in ((9, 5), (1, 5), (23, 1)):
        qkv = make_qkv(s, b, 3, G, D, dtype)
        dq, dk, dv = strided_grads(s, b, 3, G, D, dtype)
        pos = ragged_positions(s, b)
        q, k, v, dx = run(qkv, dq, dk, dv, 3, D, positions=pos, backend=backend)
        q_ref, k_ref, v_ref, dx_ref = reference(qkv, dq, dk, dv, G, D, 0, positions=pos)
        assert rel(q, q_ref) < tol and rel(k, k_ref) < tol and rel(dx, dx_ref) < tol, (
            s, b, rel(q, q_ref), rel(k, k_ref), rel(dx, dx_ref))
        assert torch.equal(v, qkv[..., (G + 1) * D :]) and torch.equal(dx[..., (G + 1) * D :], dv)


@pytest.mark.parametrize("backend", BACKENDS)
def test_positions_equal_offset_bitwise(backend):
    """positions = offset + t on every row gives bitwise what offset gives: the kernel's own fp64 cos / sin round
    to the tables' values, so training (offset) and generation (positions) rotate alike. Also int32 positions."""
    s, b, ng, G, D, offset = 37, 3, 3, 2, 24, 32760
    qkv = make_qkv(s, b, ng, G, D, torch.float32, seed=12)
    dq, dk, dv = strided_grads(s, b, ng, G, D, torch.float32, seed=13)
    pos = torch.arange(offset, offset + s, device=DEV)[:, None].expand(s, b)
    by_offset = run(qkv, dq, dk, dv, ng, D, offset=offset, backend=backend)
    for p in (pos, pos.to(torch.int32)):
        by_positions = run(qkv, dq, dk, dv, ng, D, positions=p, backend=backend)
        assert all(torch.equal(a, c) for a, c in zip(by_offset, by_positions))


def test_tables_at_positions():
    """rope_tables_at: [*positions.shape, D/2], exact to fp32 rounding; rope_tables are its values at offset + t."""
    pos = ragged_positions(4, 3)
    cos, sin = ops.rope_tables_at(pos, 64, 10000.0)
    assert cos.shape == sin.shape == (4, 3, 32) and cos.dtype == torch.float32
    ang = pos.cpu().double()[..., None] * 10000.0 ** (-torch.arange(0, 64, 2, dtype=torch.float64) / 64)
    assert (cos.cpu().double() - ang.cos()).abs().max().item() < 1e-7
    assert (sin.cpu().double() - ang.sin()).abs().max().item() < 1e-7
    tables = ops.rope_tables(8, 100, 64, 10000.0, torch.device(DEV))
    at = ops.rope_tables_at(torch.arange(100, 108, device=DEV), 64, 10000.0)
    assert all(torch.equal(a, c) for a, c in zip(tables, at))


def test_tables_are_cached_and_exact():
    cos, sin = ops.rope_tables(8, 32760, 64, 10000.0, torch.device(DEV))
    assert ops.rope_tables(8, 32760, 64, 10000.0, torch.device(DEV))[0] is cos  # cached
    assert cos.shape == sin.shape == (8, 32) and cos.dtype == torch.float32 and cos.is_contiguous()
    inv = 10000.0 ** (-torch.arange(0, 64, 2, dtype=torch.float64) / 64)
    ang = torch.arange(32760, 32768, dtype=torch.float64)[:, None] * inv
    # exact to fp32 rounding at position 32k (fp32 angles would be off by up to ~2e-3 there)
    assert (cos.cpu().double() - ang.cos()).abs().max().item() < 1e-7
    assert (sin.cpu().double() - ang.sin()).abs().max().item() < 1e-7


def test_bad_inputs_raise_clear_errors():
    x = torch.randn(5, 2, 3, 3 * 16, device=DEV)
    with pytest.raises(ValueError, match=r"head_dim \(15\) must be even"):
        rope_split_qkv(torch.randn(5, 2, 45, device=DEV), 1, 15)
    with pytest.raises(ValueError, match=r"num_query_groups \(2\) must be >= 1 and match qkv's dim 2"):
        rope_split_qkv(x, 2, 16)
    with pytest.raises(ValueError, match=r"with G >= 1 query heads per group"):
        rope_split_qkv(torch.randn(5, 2, 3, 2 * 16, device=DEV), 3, 16)
    with pytest.raises(ValueError, match=r"with G >= 1 query heads per group"):
        rope_split_qkv(torch.randn(5, 2, 50, device=DEV), 1, 16)
    with pytest.raises(ValueError, match=r"offset must be an int >= 0"):
        rope_split_qkv(x, 3, 16, offset=-1)
    with pytest.raises(ValueError, match=r"give offset \(2\) or positions, not both"):
        rope_split_qkv(x, 3, 16, offset=2, positions=torch.zeros(5, 2, dtype=torch.long, device=DEV))
    with pytest.raises(TypeError, match=r"positions must be an integer tensor \[s, b\]; got a torch.float32 tensor"):
        rope_split_qkv(x, 3, 16, positions=torch.zeros(5, 2, device=DEV))
    with pytest.raises(ValueError, match=r"positions must be \[s, b\] = \(5, 2\) on .*; got \(5, 1\)"):
        rope_split_qkv(x, 3, 16, positions=torch.zeros(5, 1, dtype=torch.long, device=DEV))
    with pytest.raises(ValueError, match=r"qkv must be \[s, b, ng"):
        rope_split_qkv(torch.randn(5, 48, device=DEV), 1, 16)
    with pytest.raises(TypeError, match=r"the Triton RoPE takes .* got torch.float64 \(use backend='torch'\)"):
        rope_split_qkv(x.double(), 3, 16, backend="triton")
    with pytest.raises(ValueError, match="backend must be one of"):
        rope_split_qkv(x, 3, 16, backend="cuda")
    # fp64 on the PyTorch path: fp64 math, exact to the tables' fp32 rounding
    q = rope_split_qkv(x.double(), 3, 16, offset=7, backend="torch")[0]
    assert q.dtype == torch.float64
    assert (q - rope64(x[..., :16], torch.arange(7, 12, device=DEV))).abs().max().item() < 1e-6


def _compiled(rank, world):
    s, b, ng, G, D = 37, 2, 3, 2, 24
    qkv = make_qkv(s, b, ng, G, D, torch.float32, seed=7)
    dq, dk, dv = strided_grads(s, b, ng, G, D, torch.float32, seed=8)
    torch.library.opcheck(ops.rope_split_qkv_fwd_op, (qkv, G, D, 3, 10000.0))
    torch.library.opcheck(ops.rope_split_qkv_bwd_op, (dq, dk, dv, 3, 10000.0, torch.float32))
    f = torch.compile(lambda x: rope_split_qkv(x, ng, D, offset=3, backend="triton"), backend="aot_eager",
                      fullgraph=True)
    x = qkv.detach().requires_grad_()
    out = f(x)
    (dx,) = torch.autograd.grad(out, x, (dq, dk, dv))
    ref = reference(qkv, dq, dk, dv, G, D, 3)
    errs = [rel(a, c) for a, c in zip((*out, dx), ref)]
    pos = ragged_positions(s, b)  # explicit positions through the same ops
    torch.library.opcheck(ops.rope_split_qkv_fwd_op, (qkv, G, D, 0, 10000.0, pos))
    torch.library.opcheck(ops.rope_split_qkv_bwd_op, (dq, dk, dv, 0, 10000.0, torch.float32, pos))
    f = torch.compile(lambda x, p: rope_split_qkv(x, ng, D, positions=p, backend="triton"), backend="aot_eager",
                      fullgraph=True)
    out = f(x, pos)
    (dx,) = torch.autograd.grad(out, x, (dq, dk, dv))
    ref = reference(qkv, dq, dk, dv, G, D, 0, positions=pos)
    return errs + [rel(a, c) for a, c in zip((*out, dx), ref)]


@forked_cpu
def test_custom_ops_and_torch_compile():
    """opcheck of both custom ops (fake impls, autograd registration) and torch.compile(fullgraph=True) == fp64
    (in a forked worker, like the cross-entropy test: see there)."""
    errs = run_distributed(_compiled, 1)[0]
    assert max(errs) < 2e-7, errs


@pytest.mark.gpu
@pytest.mark.parametrize("s, b", [(1, 128), (4096, 1)])
def test_bf16_positions_at_decode_and_prefill_sizes(s, b):
    """Explicit positions at generation's shapes (a decode step of 128 sequences, a packed 4096-token prefill),
    16 heads x 64, bf16, positions up to ~1M: within bf16 rounding of fp64, and bitwise equal to the offset path
    where the positions are offset + t: the kernel's fp64 __nv_cos / __nv_sin round to the tables' fp32 values."""
    D, ng = 64, 16
    qkv = make_qkv(s, b, ng, 1, D, torch.bfloat16, seed=14)
    dq, dk, dv = strided_grads(s, b, ng, 1, D, torch.bfloat16, seed=15)
    pos = ragged_positions(s, b)
    got = run(qkv, dq, dk, dv, ng, D, positions=pos, backend="triton")
    errs = [rel(a, c) for a, c in zip(got, reference(qkv, dq, dk, dv, 1, D, 0, positions=pos))]
    assert max(errs) < 4e-3, errs
    for offset in (0, 1_000_000):
        at = torch.arange(offset, offset + s, device=DEV)[:, None].expand(s, b)
        a = run(qkv, dq, dk, dv, ng, D, positions=at, backend="triton")
        c = run(qkv, dq, dk, dv, ng, D, offset=offset, backend="triton")
        assert all(torch.equal(x, y) for x, y in zip(a, c)), offset


@pytest.mark.gpu
@pytest.mark.parametrize("ng, G", [(16, 1), (4, 4)])
def test_bf16_at_model_size_vs_fp64(ng, G):
    """[8192, 4] tokens, 16 query heads x 64 (MHA, and GQA with 4 groups), bf16, positions from 8192 (a CP rank's
    shard): q, k and dqkv within bf16 rounding of fp64, v and dv bitwise; deterministic; Triton == PyTorch path
    bitwise up to fp32 op order (bf16 results equal to one rounding)."""
    s, b, D, offset = 8192, 4, 64, 8192
    qkv = make_qkv(s, b, ng, G, D, torch.bfloat16, seed=9)
    dq, dk, dv = strided_grads(s, b, ng, G, D, torch.bfloat16, seed=10)
    got = run(qkv, dq, dk, dv, ng, D, offset=offset, backend="triton")
    ref = reference(qkv, dq, dk, dv, G, D, offset)
    errs = [rel(a, c) for a, c in zip(got, ref)]
    assert max(errs) < 4e-3, errs  # bf16 rounding of the outputs: ~2-3e-3 relative
    assert torch.equal(got[2], qkv[..., (G + 1) * D :]) and torch.equal(got[3][..., (G + 1) * D :], dv)
    again = run(qkv, dq, dk, dv, ng, D, offset=offset, backend="triton")
    assert all(torch.equal(a, c) for a, c in zip(got, again))
    torch_path = run(qkv, dq, dk, dv, ng, D, offset=offset, backend="torch")
    for a, c in zip(got, torch_path):
        assert (a.float() - c.float()).abs().max().item() <= 2 ** -7 * c.float().abs().max().item()
