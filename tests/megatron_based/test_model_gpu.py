"""The whole model on a GPU: the Triton kernels inside the model (Megatron's strided ``[s, b, h]`` views, real tile
sizes, several chunks/blocks per sequence) equal the PyTorch path of the same model, and the model is causal.

The kernel tests check each op on its own; these check the mixers' use of them at the shapes of based-360m
(head dim 64, feature dim 16, window 128, conv k 3): logits and every parameter gradient, fp32 (tf32 dots) and bf16.
"""
from __future__ import annotations

import pytest
import torch

import based_kernels
from megatron_based.model.config import BasedConfig
from megatron_based.model import build_model

from ..memcheck import assert_memcheck_clean
from .helpers import in_process_group

pytestmark = pytest.mark.gpu
VOCAB = 512


def _model(dtype, pattern="CLSCLS", hidden=256, heads=4):
    torch.manual_seed(0)
    cfg = BasedConfig(layer_pattern=pattern, hidden_size=hidden, num_attention_heads=heads, feature_dim=16,
                      swa_window=128, conv_kernel_size=3, params_dtype=dtype, bf16=dtype == torch.bfloat16)
    return build_model(cfg, vocab_size=VOCAB, max_sequence_length=8192, make_vocab_size_divisible_by=8).cuda()


def _loss_and_grads(model, ids, backend):
    model.zero_grad(set_to_none=True)
    pos = torch.arange(ids.shape[1], device="cuda").expand_as(ids)
    with based_kernels.use_backend(backend):
        logits = model(ids, pos, None)  # [b, s, V]
        # a loss that weighs every position differently, so a gradient at the wrong position shows
        w = torch.linspace(0.5, 1.5, ids.shape[1], device="cuda")[None, :, None]
        (logits.float() * w).logsumexp(-1).sum().backward()
    return logits.detach().float(), {n: p.grad.detach().float().clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("dtype, tol, T", [(torch.float32, 2e-3, 1000), (torch.bfloat16, 3e-2, 4096)])
def test_model_with_kernels_equals_torch_path(dtype, tol, T, monkeypatch):
    with in_process_group(monkeypatch):
        model = _model(dtype)
        ids = torch.randint(0, VOCAB, (2, T), generator=torch.Generator().manual_seed(T)).cuda()
        want, want_g = _loss_and_grads(model, ids, "torch")
        got, got_g = _loss_and_grads(model, ids, "triton")
        err = (got - want).abs().max().item() / want.abs().max().item()
        print(f"{dtype} T={T}: logits rel err {err:.2e}")
        assert err < tol
        for name, g in want_g.items():
            gerr = (got_g[name] - g).norm().item() / max(g.norm().item(), 1e-30)
            assert gerr < tol, f"{name}: relative gradient error {gerr:.2e}"


@pytest.mark.parametrize("t0, hidden, heads", [(1, 256, 4), (128, 256, 4), (129, 256, 4), (4095, 256, 4),
                                               (4000, 1792, 16)])
def test_model_is_causal_on_gpu(t0, hidden, heads, monkeypatch):
    """Changing token t0 leaves every logit before t0 bit-identical and changes the logits at t0 (Triton path,
    bf16, T spanning many kernel chunks; head dim 64 as based-360m and 112 as based-1.3b). A leak of future tokens
    would let training copy its labels."""
    with in_process_group(monkeypatch), torch.no_grad():
        model = _model(torch.bfloat16, "CLSCLS" if hidden == 256 else "CLS", hidden, heads)
        ids = torch.randint(0, VOCAB, (2, 4096), generator=torch.Generator().manual_seed(1)).cuda()
        pos = torch.arange(4096, device="cuda").expand_as(ids)
        changed = ids.clone()
        changed[:, t0] = (changed[:, t0] + 1) % VOCAB
        a, b = model(ids, pos, None).float(), model(changed, pos, None).float()
        moved = (a - b).abs().amax(dim=(0, 2))
        first = int(moved.nonzero()[0]) if moved.any() else None
        assert first == t0, f"changing token {t0} first changed the logits at position {first}"


def test_fusions_match_plain_ops_in_bf16(monkeypatch):
    """The GPU defaults (fused SwiGLU, bias-dropout-add, cross entropy with its bf16 logits gradient) against the
    plain ops, bf16 model, loss and every gradient."""
    with in_process_group(monkeypatch):
        ids = torch.randint(0, VOCAB, (2, 1000), generator=torch.Generator().manual_seed(3)).cuda()
        pos = torch.arange(1000, device="cuda").expand_as(ids)
        out, weights = [], None
        for fuse in (False, True):
            cfg = BasedConfig(layer_pattern="CLSA", hidden_size=256, num_attention_heads=4, feature_dim=16,
                              swa_window=128, params_dtype=torch.bfloat16, bf16=True, bias_activation_fusion=fuse,
                              bias_dropout_fusion=fuse, cross_entropy_loss_fusion=fuse)
            assert cfg.cross_entropy_loss_fusion == fuse
            model = build_model(cfg, vocab_size=VOCAB, max_sequence_length=1000, make_vocab_size_divisible_by=8).cuda()
            if weights is None:  # GPU init draws from Megatron's CUDA RNG tracker: copy, do not re-seed
                weights = model.state_dict()
            else:
                model.load_state_dict(weights)
            loss = model(ids, pos, None, labels=ids.roll(-1, 1)).float().mean()
            loss.backward()
            out.append((loss.item(), {n: p.grad.float() for n, p in model.named_parameters()}))
        (l0, g0), (l1, g1) = out
        assert abs(l1 - l0) < 1e-2 * abs(l0)
        for name in g0:
            err = ((g1[name] - g0[name]).norm() / g0[name].norm()).item()
            assert err < 3e-2, f"{name}: {err:.2e}"



def test_megatron_cuda_graphs_equal_eager(monkeypatch):
    """Megatron-Core's per-layer CUDA graphs (cuda_graph_impl: local) around the BASED layers: after the capture at
    the end of the first step, replayed steps give the eager model's losses and gradients (Megatron DDP's main_grad
    buffers), on a new batch each step, all four mixers, bf16 with the fused GPU defaults."""
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
    from megatron.core.transformer.cuda_graphs import create_cudagraphs, delete_cuda_graphs

    with in_process_group(monkeypatch, cuda_graphs=True):
        runs = []
        for impl in ("none", "local"):
            cfg = BasedConfig(layer_pattern="CLSA", hidden_size=256, num_attention_heads=4, feature_dim=16,
                              swa_window=128, params_dtype=torch.bfloat16, bf16=True, cuda_graph_impl=impl)
            model = build_model(cfg, vocab_size=VOCAB, max_sequence_length=1000, make_vocab_size_divisible_by=8)
            model = model.cuda()
            if runs:
                model.load_state_dict(weights)
            else:
                weights = model.state_dict()
            ddp = DistributedDataParallel(cfg, DistributedDataParallelConfig(grad_reduce_in_fp32=True), model)
            pos = torch.arange(1000, device="cuda").expand(2, 1000)
            out = []
            for step in range(4):
                ids = torch.randint(0, VOCAB, (2, 1000), generator=torch.Generator().manual_seed(step)).cuda()
                ddp.zero_grad_buffer()
                loss = ddp(ids, pos, None, labels=ids.roll(-1, 1)).float().mean()
                loss.backward()
                if impl == "local":
                    create_cudagraphs()
                out.append((loss.item(), {n: p.main_grad.float().clone() for n, p in model.named_parameters()}))
            runs.append(out)
        graphs = [r for layer in model.decoder.layers for r in layer.cudagraph_manager.cudagraph_runners]
        assert len(graphs) == 4 and all(r.fwd_graph is not None and r.bwd_graph is not None for r in graphs)
        delete_cuda_graphs()
        for step, ((l0, g0), (l1, g1)) in enumerate(zip(*runs)):
            assert abs(l1 - l0) <= 1e-3 * abs(l0), (step, l0, l1)
            for name in g0:
                err = ((g1[name] - g0[name]).norm() / g0[name].norm()).item()
                assert err < 1e-2, f"step {step} {name}: {err:.2e}"


# The decode tests' small model (f 8, d_v 32, SWA head 32, window 8; bf16 with the fp32 residual stream): a
# training step on two sequences of 300 tokens, then eager generation from packed prompts (prefill, decode steps)
_MEMCHECK_SCRIPT = """
import os
os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
import torch
from megatron_based.inference.generation import Generator
from megatron_based.model import build_model
from megatron_based.model.config import BasedConfig
from megatron_based.runtime.parallel import initialize_parallel

initialize_parallel(1)
torch.manual_seed(0)
cfg = BasedConfig(layer_pattern="CLSC", hidden_size=128, num_attention_heads=4, feature_dim=8, swa_window=8,
                  params_dtype=torch.bfloat16, bf16=True)
model = build_model(cfg, vocab_size=100, max_sequence_length=512).cuda()
ids = torch.randint(0, 100, (2, 300), device="cuda")
model(ids, torch.arange(300, device="cuda").expand(2, 300), None).float().logsumexp(-1).sum().backward()
print(Generator(model.eval(), vocab_size=100).generate([[1, 2, 3], list(range(1, 13)), list(range(1, 10))], 8))
torch.cuda.synchronize()
print("memcheck script done")
"""


def test_small_model_under_memcheck():
    """Every kernel of a training step and of eager generation (packed-prompt prefill, decode steps) of a small
    model, in a subprocess under compute-sanitizer's memcheck: no error (the Taylor output pass read shared memory
    out of bounds at this model's shapes; tests/kernels/test_taylor_attention.py, test_kernels_under_memcheck)."""
    assert_memcheck_clean(_MEMCHECK_SCRIPT, timeout=400)
