"""The mixer interface and registry (docs/architecture.md, "Adding a mixer"): every built-in mixer satisfies the
interface, a mixer defined in this file registers, builds into a model, trains a step, stays causal, is counted by
model_flops_per_token and generates (prefill + decode steps) like full forwards; and the mixers' linear layers can be swapped through their specs."""
from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch
from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear
from megatron.core.transformer.spec_utils import ModuleSpec

from megatron_based.model import build_model
from megatron_based.model.config import ConfigError
from megatron_based.model.flops import model_flops_per_token
from megatron_based.model.mixers import (BaseConv, LongConvBaseConv, Mixer, MixerModule, SlidingWindowAttention,
                                         SoftmaxAttention, TaylorLinearAttention, get_mixer, mixer_descriptions,
                                         ZoologyShortConv, register_mixer, unregister_mixer)
from megatron_based.model.mixers.base import missing_interface
from megatron_based.model.spec import get_mixer_spec

from ..distributed import run_distributed
from .helpers import greedy_by_full_forwards, initialize_parallel, tiny_config, tiny_model


# ------------------------------------------------------------------ the toy mixer of docs/architecture.md
@dataclass
class CumulativeMeanSubmodules:
    linear_in: ModuleSpec | type = ColumnParallelLinear
    linear_out: ModuleSpec | type = RowParallelLinear


class CumulativeMean(MixerModule):
    """``y_t = W_out mean(W_in x_1 ... W_in x_t)``: a causal cumulative mean of a linear projection."""

    symbol = "M"
    description = "causal cumulative mean (toy)"

    @classmethod
    def spec(cls, linear_in=ColumnParallelLinear, linear_out=RowParallelLinear) -> ModuleSpec:
        return ModuleSpec(module=cls, submodules=CumulativeMeanSubmodules(linear_in, linear_out))

    @staticmethod
    def flops_per_token(config, seq_length: int) -> float:
        d = config.hidden_size
        return 2 * d * d + 2 * d * d + 2 * d  # two projections, a running sum and a division per channel

    @staticmethod
    def parameter_count(config) -> tuple[int, int]:
        return 2 * config.hidden_size ** 2, 0

    @staticmethod
    def activation_width(config) -> int:
        return 2 * config.hidden_size

    def __init__(self, config, layer_number=1, pg_collection=None, submodules=None, **injected):
        super().__init__(config, layer_number, pg_collection, **injected)
        submodules = submodules or CumulativeMeanSubmodules()
        d = config.hidden_size
        self.channels = d // self.tp_size
        self.linear_in = self.column_parallel(submodules.linear_in, d, d)
        self.linear_out = self.row_parallel(submodules.linear_out, d, d)

    def forward(self, hidden_states, attention_mask=None, **_):
        u, _ = self.linear_in(hidden_states)  # [s, b, d / tp]
        count = torch.arange(1, u.shape[0] + 1, dtype=u.dtype, device=u.device)[:, None, None]
        return self.linear_out(u.cumsum(0) / count)

    def inference_cache(self, batch, dtype, device, max_length=None) -> dict:
        return {"sum": torch.zeros(batch, self.channels, dtype=torch.float32, device=device),
                "count": torch.zeros(batch, 1, dtype=torch.float32, device=device)}

    def prefill(self, hidden_states, cache, prompts):
        u, _ = self.linear_in(hidden_states)  # [T, 1, c], documents at prompts.cu_seqlens
        bounds = prompts.cu_seqlens.tolist()
        means = []
        for i, (a, b) in enumerate(zip(bounds[:-1], bounds[1:])):
            total = u[a:b, 0].float().cumsum(0)
            cache["sum"][i], cache["count"][i] = total[-1], b - a
            means.append(total / torch.arange(1, b - a + 1, device=u.device)[:, None])
        return self.linear_out(torch.cat(means).to(u.dtype)[:, None])

    def step(self, hidden_states, cache, positions=None, **_):
        u, _ = self.linear_in(hidden_states)  # [1, b, c]
        cache["sum"] += u[0].float()
        cache["count"] += 1
        return self.linear_out((cache["sum"] / cache["count"]).to(u.dtype)[None])


@pytest.fixture
def toy_mixer():
    register_mixer(CumulativeMean)
    try:
        yield CumulativeMean
    finally:
        unregister_mixer("M")


# ----------------------------------------------------------------------------------------- the interface
@pytest.mark.parametrize("cls", [TaylorLinearAttention, SlidingWindowAttention, BaseConv, SoftmaxAttention,
                                 LongConvBaseConv, ZoologyShortConv])
def test_builtin_mixers_satisfy_the_interface(cls):
    assert missing_interface(cls) == []
    assert get_mixer(cls.symbol) is cls
    assert get_mixer_spec(cls.symbol).module is cls
    assert isinstance(cls.__new__(cls), Mixer)  # runtime_checkable Protocol: the members are there


def test_registry_lists_the_builtins_and_refuses_non_mixers():
    assert list(mixer_descriptions()) == ["L", "S", "C", "A", "H", "Z", "E"]
    with pytest.raises(TypeError, match="lacks .*flops_per_token"):
        register_mixer(type("NotAMixer", (), {"symbol": "N", "description": "x"}))
    with pytest.raises(ValueError, match="taken by TaylorLinearAttention"):
        register_mixer(type("Other", (CumulativeMean,), {"symbol": "L"}))
    with pytest.raises(ConfigError, match="unknown symbol 'M'"):
        tiny_config("CM")


def test_toy_mixer_flops_are_counted(toy_mixer):
    cfg = tiny_config("CMM")
    with_toy = model_flops_per_token(cfg, 16, 64)
    mlp = 2 * cfg.hidden_size * cfg.ffn_hidden_size * 3
    rest = BaseConv.flops_per_token(cfg, 16) + 3 * mlp + 2 * cfg.hidden_size * 64
    assert with_toy == pytest.approx(rest + 2 * CumulativeMean.flops_per_token(cfg, 16), rel=1e-12)


def _toy_model_worker(rank, world):
    register_mixer(CumulativeMean)
    try:
        initialize_parallel(1, 1, 1)
        model = tiny_model("CML")
        assert type(model.decoder.layers[1].self_attention) is CumulativeMean
        ids = torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(0))
        pos = torch.arange(12).expand(2, 12)
        loss = model(ids, pos, None, labels=ids)
        loss.mean().backward()
        toy = model.decoder.layers[1].self_attention
        grads = [p.grad is not None and p.grad.abs().sum().item() > 0 for p in toy.parameters()]
        with torch.no_grad():
            base = model(ids, pos, None)
            ids2 = ids.clone()
            ids2[:, 7] = (ids2[:, 7] + 1) % 64
            out = model(ids2, pos, None)
        causal = bool(torch.equal(out[:, :7], base[:, :7])) and (out[:, 7:] - base[:, 7:]).abs().max().item() > 0

        # the inference interface: step by step equals the parallel forward
        x = torch.randn(12, 2, 32)
        with torch.no_grad():
            full, _ = toy(x)
            cache = toy.inference_cache(2, x.dtype, x.device)
            steps = torch.cat([toy.step(x[t:t + 1], cache, torch.full((2,), t))[0] for t in range(12)])
        # ... and through the generator (prefill of ragged prompts, then decode): greedy == full forwards
        from megatron_based.inference.generation import Generator

        model.eval()
        prompts = [[5, 9, 2], [7, 1, 3, 3, 8, 2, 6]]
        greedy = Generator(model, vocab_size=64).generate(prompts, 6)
        reference = greedy_by_full_forwards(model, prompts, 6, 64)
        return {"finite": bool(torch.isfinite(loss).all()), "grads": grads, "causal": causal,
                "step": (steps - full).abs().max().item(), "generate": (greedy, reference)}
    finally:
        unregister_mixer("M")


def test_toy_mixer_builds_trains_and_is_causal():
    result = run_distributed(_toy_model_worker, 1)[0]
    assert result["finite"] and result["grads"] and all(result["grads"])
    assert result["causal"]
    assert result["step"] < 1e-5
    greedy, reference = result["generate"]
    assert greedy == reference


# ------------------------------------------------------------------------------------- swapping linears
class RecordingColumn(ColumnParallelLinear):
    built = []

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        RecordingColumn.built.append(tuple(self.weight.shape))


class RecordingRow(RowParallelLinear):
    built = []

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        RecordingRow.built.append(tuple(self.weight.shape))


def _swap_worker(rank, world):
    initialize_parallel(1, 1, 1)
    ids = torch.randint(0, 64, (2, 10), generator=torch.Generator().manual_seed(0))
    pos = torch.arange(10).expand(2, 10)
    default = tiny_model("CLSA")
    linears = {"L": {"linear_qkv": RecordingColumn, "linear_proj": RecordingRow},
               "S": {"linear_qkv": RecordingColumn, "linear_proj": RecordingRow},
               "C": {"linear_in": RecordingColumn, "linear_out": RecordingRow},
               "A": {"linear_qkv": RecordingColumn, "linear_proj": RecordingRow}}
    torch.manual_seed(0)  # as tiny_model
    swapped = build_model(tiny_config("CLSA"), vocab_size=64, max_sequence_length=64, make_vocab_size_divisible_by=8,
                          linears=linears)
    kinds = [(type(layer.self_attention.linear_qkv if hasattr(layer.self_attention, "linear_qkv")
                    else layer.self_attention.linear_in).__name__) for layer in swapped.decoder.layers]
    same_params = all(torch.equal(a, b) for a, b in zip(default.state_dict().values(), swapped.state_dict().values())
                      if isinstance(a, torch.Tensor))
    with torch.no_grad():
        equal = bool(torch.equal(default(ids, pos, None), swapped(ids, pos, None)))
    return {"kinds": kinds, "columns": len(RecordingColumn.built), "rows": len(RecordingRow.built),
            "same_params": same_params, "keys": list(default.state_dict()) == list(swapped.state_dict()),
            "equal": equal}


def test_linear_layers_swap_through_the_spec():
    result = run_distributed(_swap_worker, 1)[0]
    assert result["kinds"] == ["RecordingColumn"] * 4
    assert result["columns"] == 4 and result["rows"] == 4
    assert result["keys"] and result["same_params"] and result["equal"]


def test_get_mixer_spec_takes_linears():
    spec = get_mixer_spec("C", linear_in=RecordingColumn)
    assert spec.submodules.linear_in is RecordingColumn and spec.submodules.linear_out is RowParallelLinear
    assert get_mixer_spec("A", linear_proj=RecordingRow).submodules.linear_proj is RecordingRow
