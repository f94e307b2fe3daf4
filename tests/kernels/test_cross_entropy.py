"""Vocab-parallel cross entropy (based_kernels.cross_entropy) against fp64 torch.nn.functional.cross_entropy:
loss and logits gradient under a non-uniform upstream gradient, odd shapes with the vocabulary longer than one
kernel block, strided rows, in-place backward, extreme logits, out-of-range targets, TP=2 over gloo == unsplit,
torch.compile, and the model's loss (Triton path == Megatron's vocab_parallel_cross_entropy, TP 1 and 2).
CPU runs the kernels under TRITON_INTERPRET=1 (block 64 < V); bf16 at based-360m's size is marked gpu."""
import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

from based_kernels import use_backend
from based_kernels.cross_entropy import kernels, ops, vocab_parallel_cross_entropy

from ..distributed import run_distributed

DEV = "cuda" if torch.cuda.is_available() else "cpu"
BACKENDS = ["triton", "torch"]
# The gloo tests fork workers that run the kernels on CPU tensors: TRITON_INTERPRET=1 machines only (a worker
# forked after the parent touched CUDA cannot use it).
forked_cpu = pytest.mark.skipif(torch.cuda.is_available(), reason="forked CPU workers, kernels under the interpreter")


def rel(a, b):
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm()).item()


def make(N, V, dtype, scale=3.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(N, V, generator=g) * scale).to(DEV, dtype)
    t = torch.randint(0, V, (N,), generator=g).to(DEV)
    dloss = torch.rand(N, generator=g).to(DEV) + 0.5  # non-uniform upstream gradient
    return x, t, dloss


def fp64_reference(x, t, dloss):
    """Loss and logits gradient of F.cross_entropy in fp64 from the same (rounded) logits."""
    xr = x.detach().double().requires_grad_()
    loss = F.cross_entropy(xr, t, reduction="none")
    (grad,) = torch.autograd.grad(loss, xr, dloss.double())
    return loss, grad


def run(x, t, dloss, **kw):
    x = x.detach().requires_grad_()
    loss = vocab_parallel_cross_entropy(x, t, **kw)
    (grad,) = torch.autograd.grad(loss, x, dloss)
    return loss, grad


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype, grad_tol", [(torch.float32, 1e-6), (torch.float16, 1e-3)])
def test_matches_fp64(backend, dtype, grad_tol):
    assert kernels.BWD_BLOCK_V < 203 or DEV == "cuda"
    x, t, dloss = make(37, 203, dtype)
    loss, grad = run(x, t, dloss, backend=backend)
    loss_ref, grad_ref = fp64_reference(x, t, dloss)
    assert loss.dtype == torch.float32 and loss.shape == (37,) and grad.dtype == dtype
    assert (loss.double() - loss_ref).abs().max().item() < 1e-5
    assert rel(grad, grad_ref) < grad_tol  # fp16: the rounding of the stored gradient


@pytest.mark.parametrize("backend", BACKENDS)
def test_batched_strided_rows_and_inplace_backward(backend):
    """int32 targets; logits [s, b, V] as column slices of a wider buffer (row stride 256, not V); the in-place
    backward writes the gradient into the logits' own storage, equal to the out-of-place one."""
    s, b, V = 5, 3, 203
    buf, _, _ = make(s * b, 256, torch.float32, seed=1)
    x = buf.view(s, b, 256)[..., :V]
    g = torch.Generator().manual_seed(2)
    t = torch.randint(0, V, (s, b), generator=g).to(DEV, torch.int32)  # int32 ids are taken too
    dloss = torch.rand(s, b, generator=g).to(DEV)
    loss_ref, grad_ref = fp64_reference(x.reshape(-1, V), t.reshape(-1).long(), dloss.reshape(-1))
    loss, grad = run(x, t, dloss, backend=backend)
    assert loss.shape == (s, b) and grad.shape == (s, b, V)
    assert (loss.double().flatten() - loss_ref).abs().max().item() < 1e-5
    assert rel(grad.reshape(-1, V), grad_ref) < 1e-6

    leaf = buf.clone().requires_grad_()
    logits = leaf.view(s, b, 256)[..., :V] * 1.0  # a non-leaf, like the output layer's result
    loss2 = vocab_parallel_cross_entropy(logits, t, inplace_backward=True, backend=backend)
    (grad2,) = torch.autograd.grad(loss2, logits, dloss)
    assert grad2.data_ptr() == logits.data_ptr()  # written into the logits
    assert torch.equal(loss2, loss) and torch.equal(grad2, grad)


@pytest.mark.parametrize("backend", BACKENDS)
def test_extreme_logits_stay_finite(backend):
    """Logits of +-1e4 in fp32 (a naive exp overflows): finite, and equal to fp64."""
    x, t, dloss = make(37, 203, torch.float32, scale=1.0, seed=3)
    x = torch.where(x > 0.5, 1e4, torch.where(x < -0.5, -1e4, x))
    x[0] = -1e4  # a row that is flat at -1e4
    x[1, 7] = 1e4 + 1.0  # one dominant logit
    loss, grad = run(x, t, dloss, backend=backend)
    loss_ref, grad_ref = fp64_reference(x, t, dloss)
    assert torch.isfinite(loss).all() and torch.isfinite(grad).all()
    # (m - x_t) + log s: the fp32 result's own rounding only (losses up to 2e4 here)
    assert ((loss.double() - loss_ref).abs() <= 1e-7 * loss_ref.abs() + 1e-5).all()
    assert (grad.double() - grad_ref).abs().max().item() < 1e-7  # fp32 rounding of gradients up to 1


@pytest.mark.parametrize("backend", BACKENDS)
def test_target_outside_the_slice_gives_logsumexp(backend):
    """Megatron's rule: a target in no rank's slice contributes no target logit and no one-hot gradient."""
    x, t, dloss = make(9, 203, torch.float32, seed=4)
    t[::2] = 203 + torch.arange(5, device=DEV)
    loss, grad = run(x, t, dloss, backend=backend)
    lse = torch.logsumexp(x.double(), -1)
    sm = torch.softmax(x.double(), -1) * dloss.double()[:, None]
    assert (loss.double()[::2] - lse[::2]).abs().max().item() < 1e-5
    assert (grad.double()[::2] - sm[::2]).abs().max().item() < 1e-7


def test_bad_inputs_raise_clear_errors():
    x = torch.randn(4, 10, device=DEV)
    with pytest.raises(ValueError, match=r"target \(4, 1\) must be logits.shape\[:-1\] = \(4,\)"):
        vocab_parallel_cross_entropy(x, torch.zeros(4, 1, dtype=torch.long, device=DEV))
    with pytest.raises(TypeError, match="target must hold int64 or int32"):
        vocab_parallel_cross_entropy(x, torch.zeros(4, device=DEV))
    with pytest.raises(TypeError, match="the Triton cross entropy takes"):
        vocab_parallel_cross_entropy(x.double(), torch.zeros(4, dtype=torch.long, device=DEV), backend="triton")
    with pytest.raises(ValueError, match="V_local >= 1"):
        vocab_parallel_cross_entropy(x[:, :0], torch.zeros(4, dtype=torch.long, device=DEV))


def _compiled(rank, world):
    x, t, dloss = make(37, 203, torch.float32, seed=5)
    torch.library.opcheck(ops.cross_entropy_fwd_op, (x, t, 0, None))
    m = x.amax(-1)
    ms = torch.stack([m, torch.log(torch.exp(x - m[:, None]).sum(-1))])
    torch.library.opcheck(ops.cross_entropy_bwd_op, (x, t, ms, dloss, 0))
    f = torch.compile(lambda x, t: vocab_parallel_cross_entropy(x, t, backend="triton"), backend="aot_eager",
                      fullgraph=True)
    xc = x.detach().requires_grad_()
    loss = f(xc, t)
    (grad,) = torch.autograd.grad(loss, xc, dloss)
    loss_ref, grad_ref = fp64_reference(x, t, dloss)
    return (loss.double() - loss_ref).abs().max().item(), rel(grad, grad_ref)


@forked_cpu
def test_custom_ops_and_torch_compile():
    """opcheck of both custom ops (fake impls, autograd registration) and torch.compile(fullgraph=True) == fp64.
    In a forked worker: after opcheck or a compiled backward in the parent, forked workers of later tests hang in
    torch.compile or cannot run autograd ("autograd's threading in combination with fork")."""
    loss_err, grad_err = run_distributed(_compiled, 1)[0]
    assert loss_err < 1e-5 and grad_err < 1e-6


# ------------------------------------------------------------------------------------ TP=2 (gloo, CPU processes)
def _tp2(rank, world, backend, dtype):
    dist.init_process_group("gloo")
    V_local = 101  # V = 202: neither a power of two nor a block multiple
    x, t, dloss = make(37, 2 * V_local, dtype, seed=6)
    t[:3] = 2 * V_local + 5  # outside both slices
    t[3], t[4] = V_local - 1, V_local  # the slice edges
    part = x[:, rank * V_local:(rank + 1) * V_local]
    loss, grad = run(part, t, dloss, tp_group=dist.group.WORLD, backend=backend)
    whole_loss, whole_grad = run(x, t, dloss, backend=backend)
    return loss, grad, whole_loss, whole_grad[:, rank * V_local:(rank + 1) * V_local], x, t, dloss


@forked_cpu
@pytest.mark.parametrize("backend, dtype", [("triton", torch.float32), ("torch", torch.float32),
                                            ("triton", torch.float16)])
def test_tp2_split_vocab_equals_unsplit(backend, dtype):
    results = run_distributed(_tp2, 2, backend, dtype)
    tol = 1e-6 if dtype == torch.float32 else 1e-3
    for loss, grad, whole_loss, whole_grad, *_ in results:
        assert torch.equal(loss, results[0][0])  # every rank holds the same per-token loss
        assert (loss - whole_loss).abs().max().item() < 1e-5
        assert rel(grad, whole_grad) < tol
    x, t, dloss = results[0][4:]
    loss_ref, grad_ref = fp64_reference(x, t.clamp(max=201), dloss)
    loss_ref[:3] = torch.logsumexp(x[:3].double(), -1)  # targets outside both slices: no target logit
    grad_ref[:3] = torch.softmax(x[:3].double(), -1) * dloss[:3, None].double()
    assert (results[0][0].double() - loss_ref).abs().max().item() < 1e-5
    assert rel(torch.cat([r[1] for r in results], 1), grad_ref) < tol


# --------------------------------------------------------------------------- the model: Triton path == Megatron's
def _model_loss(rank, world, tp):
    from tests.megatron_based.helpers import full_grads, initialize_parallel, tiny_model
    from megatron.core import parallel_state

    initialize_parallel(tp, 1, 1)
    g = torch.Generator().manual_seed(7)
    ids, labels = torch.randint(0, 64, (2, 12), generator=g), torch.randint(0, 64, (2, 12), generator=g)
    pos = torch.arange(12).expand(2, 12)
    dloss = torch.rand(2, 12, generator=g)
    launches, kernel = [], ops.stats_triton
    ops.stats_triton = lambda *a: launches.append(1) or kernel(*a)  # count the Triton forward launches
    out = []
    for fused in (False, True):  # Megatron's vocab_parallel_cross_entropy, then ours (Triton, interpreter)
        model = tiny_model("CLSA", tensor_model_parallel_size=tp, cross_entropy_loss_fusion=fused)
        with use_backend("triton" if fused else None):
            loss = model(ids, pos, None, labels=labels)
        (loss * dloss).sum().backward()
        out.append((loss.detach(), full_grads(model, parallel_state.get_tensor_model_parallel_group())))
        assert len(launches) == fused, "the fused config must run the Triton kernel once, Megatron's path never"
    return out


@forked_cpu
@pytest.mark.parametrize("tp", [1, 2])
def test_model_loss_triton_path_equals_megatron(tp):
    (loss_ref, grads_ref), (loss, grads) = run_distributed(_model_loss, tp, tp)[0]
    assert loss.shape == (2, 12) and loss.dtype == torch.float32
    assert (loss - loss_ref).abs().max().item() < 1e-5
    assert set(grads) == set(grads_ref)
    for name in grads_ref:
        assert rel(grads[name], grads_ref[name]) < 1e-5, name


def test_config_rejects_unknown_impl():
    from megatron_based.model.config import BasedConfig, ConfigError

    with pytest.raises(ConfigError, match="cross_entropy_fusion_impl must be 'triton', 'native' or 'te'"):
        BasedConfig(layer_pattern="C", hidden_size=8, num_attention_heads=1, cross_entropy_fusion_impl="fast")


# ------------------------------------------------------------------------------------------------------- GPU
@pytest.mark.gpu
def test_bf16_at_based_360m_size_vs_fp32_torch():
    """[32768, 50264] bf16 logits: loss vs fp32 F.cross_entropy of the same values, the bf16 gradient vs the fp32
    one (relative error at bf16 rounding), deterministic, and the in-place backward bitwise equal."""
    N, V = 32768, 50264
    g = torch.Generator(device="cuda").manual_seed(0)
    x = (torch.randn(N, V, device="cuda", generator=g) * 4).to(torch.bfloat16)
    t = torch.randint(0, V, (N,), device="cuda", generator=g)
    dloss = torch.rand(N, device="cuda", generator=g) / N
    loss, grad = run(x, t, dloss)
    loss2, grad2 = run(x, t, dloss)
    assert torch.equal(loss, loss2) and torch.equal(grad, grad2)
    xf = x.float().requires_grad_()
    loss_ref = F.cross_entropy(xf, t, reduction="none")
    (grad_ref,) = torch.autograd.grad(loss_ref, xf, dloss)
    assert grad.dtype == torch.bfloat16
    assert (loss - loss_ref).abs().max().item() < 1e-4
    assert rel(grad, grad_ref) < 8e-3
    del xf, grad_ref
    x_in = x.clone().requires_grad_()
    logits = x_in * 1
    loss3 = vocab_parallel_cross_entropy(logits, t, inplace_backward=True)
    (grad3,) = torch.autograd.grad(loss3, logits, dloss)
    assert grad3.data_ptr() == logits.data_ptr() and torch.equal(grad3, grad) and torch.equal(loss3, loss)
