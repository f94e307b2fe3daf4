"""Mixers, specs and model builder (issue 2): exact math against formulas written here from based-spec.md,
causality, parameter counts, pipeline slicing, config errors, and TP=2 (+SP) == TP=1."""
import math

import pytest
import torch
import torch.nn.functional as F
import yaml

from megatron_based.model.config import BasedConfig, ConfigError, model_spec_from_dict
from megatron_based.model import build_model
from megatron_based.model.spec import get_based_block_spec

from ..distributed import run_distributed
from .helpers import initialize_parallel, loss_logits_grads, tiny_config, tiny_model


# ---------------------------------------------------------------- config validation (no process group needed)
@pytest.mark.parametrize("kwargs, message", [
    (dict(layer_pattern="CLX"), "unknown symbol 'X' at layer 2"),
    (dict(layer_pattern="CLS", num_layers=4), "layer_pattern has 3 symbols but num_layers is 4"),
    (dict(layer_pattern=""), "layer_pattern is empty"),
    (dict(layer_pattern="S", swa_window=0), "swa_window (0) must be >= 1"),
    (dict(layer_pattern="L", hidden_size=48, num_attention_heads=6, tensor_model_parallel_size=4),
     "num_attention_heads (6) must be divisible by tensor_model_parallel_size (4)"),
    (dict(layer_pattern="L", hidden_size=30), "hidden_size (30) must be divisible by num_attention_heads (4)"),
    (dict(layer_pattern="C", conv_kernel_size=7), "conv_kernel_size (7) must be in 2..4"),
    (dict(layer_pattern="L", feature_dim=0), "feature_dim (0) must be in 1..64"),
    (dict(layer_pattern="C", num_attention_heads=0), "num_attention_heads (0) must be >= 1"),  # was a ZeroDivisionError
    (dict(layer_pattern="C", hidden_size=-8), "hidden_size (-8) must be >= 1"),  # was a failure to build the model
])
def test_config_errors_say_what_to_change(kwargs, message):
    base = dict(hidden_size=32, num_attention_heads=4)
    base.update(kwargs)
    with pytest.raises(ConfigError) as err:
        BasedConfig(**base)
    assert message in str(err.value)


def test_model_section_rejects_unknown_keys():
    with pytest.raises(ConfigError, match=r"unknown model key\(s\) \['hiden_size'\]"):
        model_spec_from_dict({"layer_pattern": "C", "hiden_size": 8, "vocab_size": 10})
    with pytest.raises(ConfigError, match="model.vocab_size is missing"):
        model_spec_from_dict({"layer_pattern": "C", "hidden_size": 8, "num_attention_heads": 1})


@pytest.mark.parametrize("key, value, message", [
    ("hidden_size", "abc", "model.hidden_size must be int, got 'abc'"),
    ("hidden_size", 8.5, "model.hidden_size must be int, got 8.5"),
    ("hidden_size", True, "model.hidden_size must be int, got True"),
    ("layer_pattern", 123, "model.layer_pattern must be str, got 123"),
    ("rope_base", "abc", "model.rope_base must be float, got 'abc'"),  # was a failure in the first step's kernel
    ("ffn_hidden_size", "abc", "model.ffn_hidden_size must be int or null, got 'abc'"),
    ("rope_fusion", "yes", "model.rope_fusion must be bool, got 'yes'"),
    ("vocab_size", "abc", "model.vocab_size ('abc') must be a positive integer"),
    ("make_vocab_size_divisible_by", 0, "model.make_vocab_size_divisible_by (0) must be a positive integer"),
])
def test_model_section_values_of_the_wrong_type_name_the_key(key, value, message):
    """A YAML value of the wrong type was a TypeError traceback from a comparison in BasedConfig or Megatron (or
    failed only in the model's first forward, or inside the training loop); now one message naming the key."""
    section = {"layer_pattern": "CS", "hidden_size": 8, "num_attention_heads": 1, "vocab_size": 10, key: value}
    with pytest.raises(ConfigError) as err:
        model_spec_from_dict(section)
    assert str(err.value) == message


def test_model_section_float_fields_take_ints_and_unparsed_exponents():
    """YAML 1.1 reads 1e-6 (no dot) as a string; a float field takes it, and an int, as floats."""
    spec = model_spec_from_dict({"layer_pattern": "C", "hidden_size": 8, "num_attention_heads": 1, "vocab_size": 10,
                                 "layernorm_epsilon": "1e-6", "rope_base": 500, "ffn_hidden_size": None})
    assert spec.config.layernorm_epsilon == 1e-6 and spec.config.rope_base == 500.0
    assert isinstance(spec.config.rope_base, float) and spec.config.ffn_hidden_size == 256


@pytest.mark.parametrize("seq_length", [0, -4, 2.5])
def test_model_section_rejects_a_sequence_length_below_one(seq_length):
    """seq_length 0 would reach the integer division by it in Megatron's dataset index builder (helpers.cpp), whose
    SIGFPE kills the process without a message."""
    with pytest.raises(ConfigError, match=rf"model.seq_length \({seq_length}\) must be a positive integer"):
        model_spec_from_dict({"layer_pattern": "C", "hidden_size": 8, "num_attention_heads": 1, "vocab_size": 10,
                              "seq_length": seq_length})


# ---------------------------------------------------------------- single-rank checks (one forked gloo process)
def _count_and_slice(rank, world):
    initialize_parallel(1, 1, 1)
    counts = {}
    for name in ("based-360m", "based-1.3b"):
        with open(f"configs/{name}.yaml") as fh:
            spec = model_spec_from_dict(yaml.safe_load(fh)["model"], use_cpu_initialization=True,
                                        perform_initialization=False)
        with torch.device("meta"):  # shapes only: nothing is allocated
            model = build_model(spec.config, vocab_size=spec.vocab_size, max_sequence_length=spec.seq_length,
                                make_vocab_size_divisible_by=spec.make_vocab_size_divisible_by)
        counts[name] = (sum(p.numel() for p in model.parameters()), spec.padded_vocab_size)
    cfg = BasedConfig(layer_pattern="CLSCCA", hidden_size=16, num_attention_heads=2, pipeline_model_parallel_size=2,
                      pipeline_dtype=torch.float32)
    stages = []
    for pp_rank in range(2):
        specs = get_based_block_spec(cfg, pp_rank=pp_rank).layer_specs
        stages.append([s.submodules.self_attention.module.__name__ for s in specs])
    return counts, stages


def test_parameter_counts_and_pipeline_slicing():
    counts, stages = run_distributed(_count_and_slice, 1)[0]
    assert counts["based-360m"] == (362_620_928, 50264)
    assert counts["based-1.3b"] == (1_349_453_056, 50264)
    assert stages == [["BaseConv", "TaylorLinearAttention", "SlidingWindowAttention"],
                      ["BaseConv", "BaseConv", "SoftmaxAttention"]]


def naive_taylor(q, k, v):
    T, f = q.shape[0], q.shape[-1]
    s = torch.einsum("thf,jhf->htj", q, k) / math.sqrt(f)
    w = (1 + s + s * s / 2) * torch.ones(T, T, dtype=q.dtype).tril()
    return torch.einsum("htj,jhd->thd", w, v) / w.sum(-1).T.unsqueeze(-1)


def rope(x, base=10000.0):
    """RoPE as a complex rotation of pairs (i, i + d/2), written independently of Megatron's helper."""
    T, H, d = x.shape
    inv = base ** (-torch.arange(0, d, 2, dtype=x.dtype) / d)
    ang = torch.arange(T, dtype=x.dtype)[:, None] * inv[None]
    z = torch.complex(x[..., : d // 2], x[..., d // 2 :]) * torch.polar(torch.ones_like(ang), ang)[:, None]
    return torch.cat([z.real, z.imag], dim=-1)


def _mixers_vs_formulas(rank, world):
    initialize_parallel(1, 1, 1)
    torch.manual_seed(0)
    cfg = tiny_config("LSC", params_dtype=torch.float64, swa_window=5)
    model = build_model(cfg, vocab_size=64, max_sequence_length=64).double()
    T, d, H = 23, cfg.hidden_size, cfg.num_attention_heads
    x = torch.randn(T, 1, d, dtype=torch.float64)
    errs = {}
    # L: per-head rows [q_h | k_h | v_h]
    mix = model.decoder.layers[0].self_attention
    f, dh = cfg.feature_dim, d // H
    w = mix.linear_qkv.weight.view(H, 2 * f + dh, d)
    q, k, v = (torch.einsum("hod,td->tho", w[:, a:b], x[:, 0]) for a, b in ((0, f), (f, 2 * f), (2 * f, 2 * f + dh)))
    want = naive_taylor(q, k, v).reshape(T, d) @ mix.linear_proj.weight.T
    errs["L"] = ((mix(x)[0][:, 0] - want).abs().max() / want.abs().max()).item()
    # S: RoPE, window 5 (6 keys), scale 1/sqrt(dh)
    mix = model.decoder.layers[1].self_attention
    w = mix.linear_qkv.weight.view(H, 3, dh, d)
    q, k, v = (torch.einsum("hod,td->tho", w[:, i], x[:, 0]) for i in range(3))
    q, k = rope(q), rope(k)
    s = torch.einsum("thd,jhd->htj", q, k) / math.sqrt(dh)
    t_idx, j_idx = torch.arange(T)[:, None], torch.arange(T)[None]
    s = s.masked_fill(~((j_idx <= t_idx) & (j_idx >= t_idx - 5)), -math.inf)
    want = torch.einsum("htj,jhd->thd", s.softmax(-1), v).reshape(T, d) @ mix.linear_proj.weight.T
    errs["S"] = ((mix(x)[0][:, 0] - want).abs().max() / want.abs().max()).item()
    # C: u = W_in x + b; c = conv(u1) with tap k-1 on the current token; y = W_out(SiLU(c) * u2) + b_out
    mix = model.decoder.layers[2].self_attention
    u = x[:, 0] @ mix.linear_in.weight.T + mix.linear_in.bias
    u1, u2 = u[:, : 2 * d], u[:, 2 * d :]
    wc = mix.conv_weight
    c = sum(wc[:, i] * F.pad(u1, (0, 0, 2 - i, 0))[:T] for i in range(3))
    want = (F.silu(c) * u2) @ mix.linear_out.weight.T + mix.linear_out.bias
    out, bias = mix(x)
    errs["C"] = ((out[:, 0] + bias - want).abs().max() / want.abs().max()).item()
    # Init as specified: N(0, 0.02), output projections N(0, 0.02/sqrt(2 * n_layer)), conv U(+-1/sqrt(3)), norms 1.
    stats = {
        "conv_bound": mix.conv_weight.abs().max().item(),
        "in_std": model.decoder.layers[0].self_attention.linear_qkv.weight.std().item(),
        "norm": model.decoder.layers[0].input_layernorm.weight.unique().tolist(),
        "bias": mix.linear_in.bias.abs().max().item(),
    }
    return errs, stats


def test_mixers_equal_the_spec_formulas():
    errs, stats = run_distributed(_mixers_vs_formulas, 1)[0]
    assert errs["L"] < 1e-12 and errs["C"] < 1e-12, errs
    assert errs["S"] < 1e-6, errs  # RoPE angles are fp32, as in Megatron's RotaryEmbedding
    assert 0.4 < stats["conv_bound"] <= 1 / math.sqrt(3)
    assert 0.015 < stats["in_std"] < 0.025
    assert stats["norm"] == [1.0] and stats["bias"] == 0.0


def _causality(rank, world):
    initialize_parallel(1, 1, 1)
    model = tiny_model("CLSA", swa_window=4)
    ids = torch.randint(0, 64, (2, 30))
    pos = torch.arange(30).expand(2, 30)
    base = model(ids, pos, None)
    leaks, reach = [], []
    for t in (0, 13, 29):
        ids2 = ids.clone()
        ids2[:, t] = (ids2[:, t] + 1) % 64
        out = model(ids2, pos, None)
        leaks.append(bool(torch.equal(out[:, :t], base[:, :t])))
        reach.append((out[:, t:] - base[:, t:]).abs().max().item())
    return leaks, reach


def test_model_is_causal_bitwise():
    leaks, reach = run_distributed(_causality, 1)[0]
    assert all(leaks)
    assert min(reach) > 0


# ---------------------------------------------------------------- TP = 2 (and sequence parallel) == TP = 1
def _loss_logits_grads(tp, sp):
    initialize_parallel(tp, 1, 1)
    model = tiny_model("CLSA", tensor_model_parallel_size=tp, sequence_parallel=sp)
    return loss_logits_grads(model)


def _tp_worker(rank, world, sp):
    ref = _loss_logits_grads(1, False)
    got = _loss_logits_grads(2, sp)
    result = {"loss": (got[0] - ref[0]).abs().max().item(), "logits": (got[1] - ref[1]).abs().max().item()}
    assert set(got[2]) == set(ref[2])
    for name in ref[2]:
        a, b = got[2][name], ref[2][name]
        assert a.shape == b.shape, (name, a.shape, b.shape)
        result[name] = ((a - b).norm() / b.norm()).item()
    return result


@pytest.mark.parametrize("sequence_parallel", [False, True])
def test_tensor_parallel_equals_single_rank(sequence_parallel):
    for result in run_distributed(_tp_worker, 2, sequence_parallel):
        assert result.pop("loss") < 1e-5
        assert result.pop("logits") < 1e-5
        assert len(result) > 20  # every parameter of 4 layers + embedding + final norm
        for name, rel in result.items():
            assert rel < 1e-5, (name, rel)


def _matmul_params(rank, world):
    initialize_parallel(1, 1, 1)
    model = tiny_model("CLSA", swa_window=4)
    return {n: p.numel() for n, p in model.named_parameters()}


def test_model_flops_count_every_matmul_once():
    """Forward FLOPs minus the sequence-mixing terms == 2 x (weights of every matrix product) + the tied head."""
    from megatron_based.model.flops import model_flops_per_token

    cfg = tiny_config("CLSA", swa_window=4)
    params = run_distributed(_matmul_params, 1)[0]
    matmul = sum(n for name, n in params.items() if name.endswith("weight") and "norm" not in name
                 and "conv_weight" not in name and "word_embeddings" not in name)
    T, d, V = 10, cfg.hidden_size, 64
    H, f, dh = cfg.linear_attention_heads, cfg.feature_dim, d // cfg.linear_attention_heads
    mixing = (4 * H * (1 + f + f * (f + 1) // 2) * (dh + 1)      # L: state update + read (symmetric map)
              + 4 * d * sum(min(t + 1, 5) for t in range(T)) / T  # S: window 4 -> up to 5 keys
              + 2 * 3 * 2 * d                                       # C: depthwise conv, k = 3, 2d channels
              + 4 * d * (T + 1) / 2)                                # A: causal softmax
    assert model_flops_per_token(cfg, T, V) == pytest.approx(2 * matmul + 2 * d * V + mixing, rel=1e-12)



def test_cuda_graph_impl_is_checked():
    """Megatron's per-layer CUDA graphs (cuda_graph_impl: local) need a GPU; other values need TransformerEngine."""
    with pytest.raises(ConfigError, match="'none' or 'local'"):
        tiny_config("CLSA", cuda_graph_impl="transformer_engine")
    with pytest.raises(ConfigError, match="recompute do not mix"):
        tiny_config("CLSA", cuda_graph_impl="local", recompute_granularity="full", recompute_method="uniform",
                    recompute_num_layers=1)
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="needs a GPU"):
            tiny_config("CLSA", cuda_graph_impl="local")


def test_normalization_other_than_rmsnorm_is_refused():
    """Every norm is RMSNorm (spec.py): a LayerNorm request is refused by name, not silently ignored, from a config
    file's model section too."""
    from megatron_based.model.config import model_spec_from_dict

    assert tiny_config("CLSA", normalization="RMSNorm").normalization == "RMSNorm"
    with pytest.raises(ConfigError, match=r"normalization must be RMSNorm .*; got 'LayerNorm'"):
        tiny_config("CLSA", normalization="LayerNorm")
    with pytest.raises(ConfigError, match=r"normalization must be RMSNorm"):
        model_spec_from_dict(dict(layer_pattern="CL", hidden_size=32, num_attention_heads=4, vocab_size=64,
                                  seq_length=16, normalization="LayerNorm"))
