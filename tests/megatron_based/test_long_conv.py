"""The H, E and Z mixers (Zoology's BaseConv with a long implicit / a long explicit / a short convolution,
megatron_based/model/mixers/long_conv, zoology_short_conv): the FFT convolution against the direct causal sum in
fp64 and its gradients; a model with it is causal, generates like its full forwards (prefill + decode steps),
counts its FLOPs, gives the same loss and gradients at TP 2 (with and without sequence parallelism) as at TP 1,
and refuses context parallelism."""
from __future__ import annotations

import pytest
import torch

from megatron_based.model.config import ConfigError
from megatron_based.model.flops import model_flops_per_token
from megatron_based.model.mixers import get_mixer
from megatron_based.model.mixers.long_conv import (ExplicitLongConvBaseConv, LongConvBaseConv, causal_fft_conv,
                                                   implicit_filter_positions)
from megatron_based.model.mixers.zoology_short_conv import ZoologyShortConv
from megatron_based.runtime.parallel import initialize_parallel
from tests.distributed import run_distributed
from megatron_based.model import build_model
from tests.megatron_based.helpers import full_grads, greedy_by_full_forwards, tiny_config


def direct_causal_conv(u, k):
    """``y_t = sum_{s <= t} k_{t-s} u_s`` by the definition, u ``[b, T, c]``, k ``[L, c]``."""
    T = u.shape[1]
    y = torch.zeros_like(u)
    for t in range(T):
        y[:, t] = (k[:t + 1].flip(0)[None] * u[:, :t + 1]).sum(1)
    return y


@pytest.mark.parametrize("T", [37, 256])
def test_fft_conv_equals_the_direct_sum(T):
    g = torch.Generator().manual_seed(T)
    u = torch.randn(2, T, 5, dtype=torch.float64, generator=g)
    k = torch.randn(T + 3, 5, dtype=torch.float64, generator=g)  # taps beyond T never reach
    ref = direct_causal_conv(u, k)
    assert torch.allclose(causal_fft_conv(u, k), ref, rtol=1e-10, atol=1e-10)
    # fp32 inputs: fp32 FFTs, fp32 result
    out32 = causal_fft_conv(u.float(), k.float())
    assert out32.dtype == torch.float32
    assert (out32.double() - ref).abs().max() < 1e-4 * ref.abs().max()


def test_fft_conv_gradients():
    g = torch.Generator().manual_seed(0)
    u = torch.randn(1, 7, 3, dtype=torch.float64, generator=g, requires_grad=True)
    k = torch.randn(7, 3, dtype=torch.float64, generator=g, requires_grad=True)
    assert torch.autograd.gradcheck(causal_fft_conv, (u, k))
    w = torch.randn(1, 7, 3, dtype=torch.float64, generator=g)
    gu, gk = torch.autograd.grad((causal_fft_conv(u, k) * w).sum(), (u, k))
    du, dk = torch.autograd.grad((direct_causal_conv(u, k) * w).sum(), (u, k))
    assert torch.allclose(gu, du, atol=1e-12) and torch.allclose(gk, dk, atol=1e-12)


def test_filter_positions_are_zoologys():
    z = implicit_filter_positions(256, torch.float64)
    assert z.shape == (256, 3)
    assert z[0].tolist() == [0.0, 1.0, -0.0] and z[-1, 0] == 1.0
    assert torch.allclose(z[:, 1] ** 2 + z[:, 2] ** 2, torch.ones(256, dtype=torch.float64))


def test_registered_and_flops_counted():
    assert get_mixer("H") is LongConvBaseConv and get_mixer("Z") is ZoologyShortConv
    assert get_mixer("E") is ExplicitLongConvBaseConv
    # E: H's count less the filter MLP, plus the filter's FFT once per sequence
    cfg = tiny_config("ZE")
    d, T = cfg.hidden_size, 64
    mlp_filter = (2 * (3 * 16 + 16 * d) * T) / T
    assert ExplicitLongConvBaseConv.flops_per_token(cfg, T) == pytest.approx(
        LongConvBaseConv.flops_per_token(cfg, T) - mlp_filter, rel=1e-12)
    cfg = tiny_config("ZH")
    assert model_flops_per_token(cfg, 64, 64) == pytest.approx(
        model_flops_per_token(tiny_config("CH"), 64, 64) - get_mixer("C").flops_per_token(cfg, 64)
        + ZoologyShortConv.flops_per_token(cfg, 64), rel=1e-12)
    cfg = tiny_config("CH")
    with_h = model_flops_per_token(cfg, 64, 64)
    without = model_flops_per_token(tiny_config("C"), 64, 64)
    mlp = 2 * cfg.hidden_size * cfg.ffn_hidden_size * 3
    assert with_h == pytest.approx(without + mlp + LongConvBaseConv.flops_per_token(cfg, 64), rel=1e-12)
    # O(T log T) per channel: the conv's share per token grows like log T
    d = cfg.hidden_size
    assert LongConvBaseConv.flops_per_token(cfg, 1024) > LongConvBaseConv.flops_per_token(cfg, 64) > 2 * d * d


def test_config_refuses_context_parallelism():
    with pytest.raises(ConfigError, match="H mixer"):
        tiny_config("CH", context_parallel_size=2)
    with pytest.raises(ConfigError, match="Z mixer"):
        tiny_config("ZA", context_parallel_size=2)
    with pytest.raises(ConfigError, match="E mixer"):
        tiny_config("CE", context_parallel_size=2)


def ch_model(pattern="ZH", **overrides):
    """Z then H, no MLPs (Zoology's BaseConv-only MQAR model), l_max 64; the same weights at any TP size."""
    torch.manual_seed(0)
    return build_model(tiny_config(pattern, **overrides), vocab_size=64, max_sequence_length=64, mlp=False)


def direct_short_conv(u, w, b):
    """u ``[b, T, c]``, w ``[c, k]``: ``y_t = sum_j w[:, j] u_{t-k+1+j} + b`` (zeros before the start)."""
    k = w.shape[1]
    padded = torch.cat([torch.zeros(u.shape[0], k - 1, u.shape[2], dtype=u.dtype), u], dim=1)
    return sum(w[:, j] * padded[:, j:j + u.shape[1]] for j in range(k)) + b


def _model_worker(rank, world, pattern):
    initialize_parallel(1, 1, 1)
    model = ch_model(pattern)
    mixer = model.decoder.layers[1].self_attention
    assert type(mixer) is get_mixer(pattern[1]) and mixer.l_max == 64
    explicit = type(mixer) is ExplicitLongConvBaseConv
    init_std = mixer.filter_taps.std().item() if explicit else None
    first = model.decoder.layers[0].self_attention
    ids = torch.randint(0, 64, (2, 40), generator=torch.Generator().manual_seed(0))
    pos = torch.arange(40).expand(2, 40)
    loss = model(ids, pos, None, labels=ids)
    loss.mean().backward()
    grads = {n: p.grad is not None and p.grad.abs().sum().item() > 0 for n, p in mixer.named_parameters()}
    with torch.no_grad():
        base = model(ids, pos, None)
        ids2 = ids.clone()
        ids2[:, 23] = (ids2[:, 23] + 1) % 64
        out = model(ids2, pos, None)
    # the FFT mixes every position in rounding error: earlier logits move only at that level
    causal = ((out[:, :23] - base[:, :23]).abs().max().item(), (out[:, 23:] - base[:, 23:]).abs().max().item())
    # the mixer's forward equals Zoology's formula written out directly
    x = torch.randn(30, 2, 32)
    with torch.no_grad():
        full, bias = mixer(x)
        # E: the filter is the parameter as Zoology stores it, [d, l_max] (taps along the sequence)
        k = mixer.filter_taps[:, :30].t() if explicit else mixer.filter(30)
        gate = x @ mixer.linear_in.weight.t() + mixer.linear_in.bias
        u = x.transpose(0, 1).double()
        ref = ((direct_causal_conv(u, k.double()) + u).transpose(0, 1) * gate.double() + x.double())
        # decode: step by step == the full forward; prefill of packed prompts then steps
        cache = mixer.inference_cache(2, x.dtype, x.device)
        steps = torch.cat([mixer.step(x[t:t + 1], cache, torch.full((2,), t))[0] for t in range(30)])
        if type(first) is ZoologyShortConv:  # layer 0: Zoology's short-conv BaseConv, its formula and its steps
            full0, _ = first(x)
            gate0 = x @ first.linear_in.weight.t() + first.linear_in.bias
            ref0 = direct_short_conv(u, first.conv_weight.double(), first.conv_bias.double()).transpose(0, 1)
            ref0 = ref0 * gate0.double() + x.double()
            cache0 = first.inference_cache(2, x.dtype, x.device)
            steps0 = torch.cat([first.step(x[t:t + 1], cache0, torch.full((2,), t))[0] for t in range(30)])
            formula0, step0 = (full0.double() - ref0).abs().max().item(), (steps0 - full0).abs().max().item()
        else:
            formula0 = step0 = 0.0
    from megatron_based.inference.generation import Generator

    model.eval()
    prompts = [[5, 9, 2], [7, 1, 3, 3, 8, 2, 6]]
    greedy = Generator(model, vocab_size=64).generate(prompts, 6)
    reference = greedy_by_full_forwards(model, prompts, 6, 64)
    counts = [(sum(p.numel() for p in m.parameters()), sum(type(m).parameter_count(model.config)))
              for m in (first, mixer)]
    return {"finite": bool(torch.isfinite(loss).all()), "grads": grads, "causal": causal, "bias": bias,
            "counts": counts,
            "formula": (full.double() - ref).abs().max().item(), "step": (steps - full).abs().max().item(),
            "formula0": formula0, "step0": step0, "init_std": init_std,
            "generate": (greedy, reference)}


@pytest.mark.parametrize("pattern", ["ZH", "CH", "ZE"])
def test_model_with_the_mixer_trains_is_causal_and_generates(pattern):
    r = run_distributed(_model_worker, 1, pattern)[0]
    assert r["finite"] and all(r["grads"].values()), r["grads"]
    before, after = r["causal"]
    assert before < 1e-6 and after > 1e-3 and r["bias"] is None
    assert r["formula"] < 1e-5
    assert r["step"] < 1e-5 and r["formula0"] < 1e-5 and r["step0"] < 1e-5
    assert all(real == counted for real, counted in r["counts"][1 if pattern[0] == "C" else 0:]), r["counts"]
    assert r["generate"][0] == r["generate"][1]
    if pattern[1] == "E":  # Zoology's torch.randn filter: N(0, 1), 32 channels x 64 taps
        assert 0.9 < r["init_std"] < 1.1


def _tp_worker(rank, world, sp, pattern="ZH"):
    from megatron.core import parallel_state

    initialize_parallel(world, 1, 1)
    model = ch_model(pattern, sequence_parallel=sp, tensor_model_parallel_size=world)
    ids = torch.randint(0, 64, (2, 48), generator=torch.Generator().manual_seed(1))
    loss = model(ids, torch.arange(48).expand(2, 48), None, labels=ids)
    loss.mean().backward()
    grads = full_grads(model, parallel_state.get_tensor_model_parallel_group())
    return loss.detach(), {n: g for n, g in grads.items() if "self_attention" in n}


@pytest.mark.parametrize("sp,pattern", [(False, "ZH"), (True, "ZH"), (True, "ZE")])
def test_tp2_equals_tp1(sp, pattern):
    loss1, grads1 = run_distributed(_tp_worker, 1, False, pattern)[0]
    loss2, grads2 = run_distributed(_tp_worker, 2, sp, pattern)[0]
    assert torch.allclose(loss1, loss2, rtol=1e-5, atol=1e-6)
    assert grads1.keys() == grads2.keys() and grads1
    for name in grads1:
        assert grads1[name].shape == grads2[name].shape, name
        assert torch.allclose(grads1[name], grads2[name], rtol=1e-4, atol=1e-6), name
