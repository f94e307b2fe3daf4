"""The fused RoPE + q/k/v split in the S and A mixers (config.rope_fusion) against Megatron's split +
apply_rotary_pos_emb path (rope_fusion=False): a tiny model's loss, logits and every parameter gradient, MHA and
GQA, with the fused op on its PyTorch path and its Triton one (interpreter on CPU), and under TP=2 with sequence parallelism
(including GQA with fewer query groups than TP ranks, where the A layer keeps Megatron's path); generation's
rotation at explicit positions bitwise the training forward's, fused and unfused. The CP, generation
and parallel-training tests run the fused path too (it is the default)."""
import pytest
import torch
from megatron.core import parallel_state

import based_kernels

from ..distributed import run_distributed
from .helpers import full_grads, gather_tp, in_process_group, initialize_parallel, tiny_model

PATTERN = "CSAS"


def _loss_logits_grads(tp, fused, groups, calls):
    initialize_parallel(tp, 1, 1)
    model = tiny_model(PATTERN, tensor_model_parallel_size=tp, sequence_parallel=tp > 1, rope_fusion=fused,
                       num_query_groups=groups)
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 64, (2, 14), generator=g)
    labels = torch.randint(0, 64, (2, 14), generator=g)
    pos = torch.arange(14).expand(2, 14)
    tp_group = parallel_state.get_tensor_model_parallel_group()
    calls.clear()
    logits = gather_tp(model(ids, pos, None), dim=-1, group=tp_group)
    loss = model(ids, pos, None, labels=labels)
    loss.sum().backward()
    return loss.detach(), logits.detach(), full_grads(model, tp_group), len(calls) // 2  # two forwards


def _worker(rank, world, backend, groups):
    calls = []
    real = based_kernels.rope_split_qkv

    def counting(*args, **kwargs):  # the fused op on the given backend (the model's other ops: PyTorch paths)
        calls.append(1)
        return real(*args, **kwargs, backend=backend)

    based_kernels.rope_split_qkv = counting  # the mixers call it through the package
    ref = _loss_logits_grads(1, False, groups, calls)
    got = {"tp1": _loss_logits_grads(1, True, groups, calls)}
    if world == 2:
        got["tp2"] = _loss_logits_grads(2, True, groups, calls)
    out = {}
    for key, res in got.items():
        errs = {"loss": (res[0] - ref[0]).abs().max().item(), "logits": (res[1] - ref[1]).abs().max().item()}
        assert set(res[2]) == set(ref[2])
        for name in ref[2]:
            errs[name] = ((res[2][name] - ref[2][name]).norm() / ref[2][name].norm()).item()
        out[key] = (errs, res[3])
    return out, ref[3]


@pytest.mark.parametrize("backend", ["torch", pytest.param("triton", marks=pytest.mark.skipif(
    torch.cuda.is_available(), reason="CPU tensors in forked workers: the Triton path runs under the interpreter"))])
@pytest.mark.parametrize("groups", [None, 2], ids=["mha", "gqa2"])
def test_fused_equals_megatron_path(backend, groups):
    out, ref_calls = run_distributed(_worker, 1, backend, groups)[0]
    assert ref_calls == 0  # rope_fusion=False never calls the fused op
    errs, calls = out["tp1"]
    assert calls == 3  # 2 S layers + 1 A layer
    assert errs.pop("loss") < 1e-5 and errs.pop("logits") < 1e-5
    assert len(errs) > 15
    bad = {n: e for n, e in errs.items() if not e < 3e-6}
    assert not bad, bad


@pytest.mark.parametrize("groups, a_fused", [(2, True), (1, False)], ids=["gqa2", "gqa1-tp2-megatron-path"])
def test_tp2_sequence_parallel_fused_equals_single_rank_unfused(groups, a_fused):
    """TP=2 + SP with the fused path == TP=1 with Megatron's. With one query group over 2 TP ranks Megatron
    all-gathers the projection: the A layer then keeps Megatron's RoPE (not fused), the S layers still fuse."""
    for out, _ in run_distributed(_worker, 2, "torch", groups):
        errs, calls = out["tp2"]
        assert calls == 2 + a_fused
        assert errs.pop("loss") < 1e-5 and errs.pop("logits") < 1e-5
        bad = {n: e for n, e in errs.items() if not e < 3e-6}
        assert not bad, bad


def _rotation_worker(rank, world, backend, fused):
    initialize_parallel(1, 1, 1)
    with based_kernels.use_backend(backend):
        model = tiny_model(PATTERN, rope_fusion=fused, num_query_groups=2).eval()
        s, b = 11, 3
        h = torch.randn(s, b, model.config.hidden_size, generator=torch.Generator().manual_seed(2))
        pos = torch.arange(s)[:, None].expand(s, b)
        layers = model.decoder.layers
        with torch.no_grad():
            swa = layers[1].self_attention
            swa_same = all(torch.equal(x, y) for x, y in zip(swa.project_qkv(h), swa.project_qkv(h, pos)))
            attn = layers[2].self_attention
            if fused:  # what SoftmaxAttention.forward sets for the training forward
                attn._rope_at = 0
                try:
                    train = attn.get_query_key_value_tensors(h)
                finally:
                    attn._rope_at = None
            else:
                from megatron.core.models.common.embeddings.rope_utils import apply_rotary_pos_emb

                from megatron_based.model.rope import rope_freqs

                q, k, v = attn.get_query_key_value_tensors(h)
                freqs = rope_freqs(s, q.shape[-1], model.config.rope_base)
                cp = attn.pg_collection.cp
                train = (apply_rotary_pos_emb(q, freqs, model.config, cp_group=cp),
                         apply_rotary_pos_emb(k, freqs, model.config, cp_group=cp), v)
            attn_same = all(torch.equal(x, y) for x, y in zip(train, attn._qkv_at(h, pos)))
    return swa_same, attn_same


@pytest.mark.parametrize("backend", ["torch", pytest.param("triton", marks=pytest.mark.skipif(
    torch.cuda.is_available(), reason="CPU tensors in forked workers: the Triton path runs under the interpreter"))])
@pytest.mark.parametrize("fused", [True, False])
def test_generation_rotates_as_training(backend, fused):
    """The q, k, v generation's prefill and decode steps compute at explicit positions (S: project_qkv(h,
    positions); A: _qkv_at) are bitwise those of the training forward's path at the same positions, fused (the
    same kernel, per-token angles) and unfused (Megatron's apply_rotary_pos_emb both ways); GQA in the A layer."""
    assert run_distributed(_rotation_worker, 1, backend, fused)[0] == (True, True)


def test_config_rejects_a_non_bool_rope_fusion():
    from megatron_based.model.config import BasedConfig, ConfigError

    with pytest.raises(ConfigError, match="rope_fusion must be true or false; got 'yes'"):
        BasedConfig(layer_pattern="S", hidden_size=32, num_attention_heads=4, rope_fusion="yes")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-3), (torch.bfloat16, 3e-2)])
def test_fused_equals_megatron_path_on_gpu(dtype, tol, monkeypatch):
    """Compiled kernels inside the model at head dim 64, T = 2048 (GQA: 2 groups of 2 heads): logits and every
    gradient with rope_fusion on == off, all other ops the same Triton kernels. The fused path rounds once from
    fp32 (Megatron's rotates in the activation dtype, from fp32 angles), hence bf16-level differences in bf16."""
    from megatron_based.model.config import BasedConfig
    from megatron_based.model import build_model

    with in_process_group(monkeypatch):
        ids = torch.randint(0, 512, (2, 2048), generator=torch.Generator().manual_seed(0)).cuda()
        pos = torch.arange(2048, device="cuda").expand_as(ids)
        w = torch.linspace(0.5, 1.5, 2048, device="cuda")[None, :, None]  # weighs each position differently
        res, weights = [], None
        for fused in (False, True):
            cfg = BasedConfig(layer_pattern="CSAS", hidden_size=256, num_attention_heads=4, num_query_groups=2,
                              swa_window=128, params_dtype=dtype, bf16=dtype == torch.bfloat16, rope_fusion=fused)
            model = build_model(cfg, vocab_size=512, max_sequence_length=2048, make_vocab_size_divisible_by=8).cuda()
            if weights is None:  # GPU init draws from Megatron's CUDA RNG tracker: copy, do not re-seed
                weights = model.state_dict()
            else:
                model.load_state_dict(weights)
            logits = model(ids, pos, None)
            (logits.float() * w).logsumexp(-1).sum().backward()
            res.append((logits.detach().float(), {n: p.grad.float() for n, p in model.named_parameters()}))
        (want, want_g), (got, got_g) = res
        assert (got - want).abs().max().item() < tol * want.abs().max().item()
        for name, g in want_g.items():
            gerr = (got_g[name] - g).norm().item() / max(g.norm().item(), 1e-30)
            assert gerr < tol, f"{name}: relative gradient error {gerr:.2e}"
