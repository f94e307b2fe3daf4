"""The "BASED layers in your own Megatron-Core model" path (issue 19): the README's snippet runs as written and
builds the BASED model, a plain TransformerConfig plus BASED keyword arguments builds the same model as a
BasedConfig, and the ways it can go wrong end in one-line errors that say what to do."""
import os
import re
from pathlib import Path

import pytest
import torch
from megatron.core import parallel_state
from megatron.core.transformer import TransformerConfig

import megatron_based
from megatron_based.model.config import BasedConfig, ConfigError, as_based_config
from megatron_based.model import build_model
from megatron_based.model.spec import get_based_block_spec

from ..distributed import run_distributed
from .helpers import initialize_parallel, tiny_config

README = Path(__file__).resolve().parents[2] / "README.md"
SECTION = "## BASED layers in your own Megatron-Core model"


def readme_snippet() -> str:
    text = README.read_text()
    section = text[text.index(SECTION):]
    section = section[: section.index("\n## ", len(SECTION))]
    blocks = re.findall(r"```python\n(.*?)```", section, flags=re.S)
    assert len(blocks) == 1, f"expected one python block under {SECTION!r}, found {len(blocks)}"
    return blocks[0]


def _shapes(model) -> dict[str, tuple]:
    return {name: tuple(p.shape) for name, p in model.named_parameters()}


def _run_readme(rank, world):
    # As a bare single process: no launcher variables, so initialize_parallel picks its own port.
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        os.environ.pop(key)
    scope = {}
    exec(compile(readme_snippet(), str(README), "exec"), scope)
    model, logits = scope["model"], scope["logits"]
    reference = build_model(BasedConfig(layer_pattern="CLSCCA", hidden_size=256, num_attention_heads=4,
                                        use_cpu_initialization=True), vocab_size=50257, max_sequence_length=2048)
    return dict(shapes=_shapes(model), reference=_shapes(reference), logits=tuple(logits.shape),
                finite=bool(torch.isfinite(logits).all()), position_embedding=model.position_embedding_type,
                tied=model.share_embeddings_and_output_weights, output_weight=model.output_layer.weight is None,
                mixers=[type(layer.self_attention).__name__ for layer in model.decoder.layers],
                norm=type(model.decoder.layers[0].input_layernorm).__name__)


def test_readme_snippet_builds_the_based_model():
    got = run_distributed(_run_readme, 1)[0]
    assert got["shapes"] == got["reference"]
    assert sum(torch.Size(s).numel() for s in got["shapes"].values()) == 17_106_432
    assert not any("position" in name for name in got["shapes"])  # no learned position table
    assert got["position_embedding"] == "none" and got["tied"] and got["output_weight"]  # head = embedding
    assert got["mixers"] == ["BaseConv", "TaylorLinearAttention", "SlidingWindowAttention", "BaseConv", "BaseConv",
                             "SoftmaxAttention"]
    assert got["norm"] == "RMSNorm"
    assert got["logits"] == (2, 64, 50264) and got["finite"]


def _plain_vs_based(rank, world):
    initialize_parallel(1, 1, 1)
    ids = torch.randint(0, 64, (2, 19), generator=torch.Generator().manual_seed(1))
    out = {}
    for name, make in (
        ("based", lambda: build_model(tiny_config("CLSA"), vocab_size=64, max_sequence_length=64)),
        ("plain", lambda: megatron_based.build_model(
            TransformerConfig(num_layers=4, hidden_size=32, num_attention_heads=4, use_cpu_initialization=True),
            layer_pattern="CLSA", feature_dim=4, swa_window=6, vocab_size=64, max_sequence_length=64)),
    ):
        torch.manual_seed(0)
        model = make()
        out[name] = (_shapes(model), model(ids, None, None).detach())
    return out


def test_plain_transformer_config_builds_the_same_model_as_based_config():
    out = run_distributed(_plain_vs_based, 1)[0]
    (based_shapes, based_logits), (plain_shapes, plain_logits) = out["based"], out["plain"]
    assert plain_shapes == based_shapes
    assert sum(torch.Size(s).numel() for s in plain_shapes.values()) == 118_400
    assert torch.equal(plain_logits, based_logits)


def test_plain_config_keeps_what_it_sets_and_takes_based_defaults_for_the_rest():
    plain = TransformerConfig(num_layers=3, hidden_size=64, num_attention_heads=4, layernorm_epsilon=1e-6,
                              init_method_std=0.01, use_cpu_initialization=True)
    cfg = as_based_config(plain, layer_pattern="CLS", swa_window=32)
    assert isinstance(cfg, BasedConfig)
    # set on the TransformerConfig or as keyword arguments: kept
    assert (cfg.layernorm_epsilon, cfg.init_method_std, cfg.use_cpu_initialization) == (1e-6, 0.01, True)
    assert (cfg.layer_pattern, cfg.swa_window, cfg.num_layers) == ("CLS", 32, 3)
    assert cfg.output_layer_init_method.keywords["std"] == pytest.approx(0.01 / 6 ** 0.5)
    # left at Megatron's defaults (a GPT-2 layer): BASED's
    assert (cfg.normalization, cfg.gated_linear_unit, cfg.add_bias_linear) == ("RMSNorm", True, False)
    assert (cfg.hidden_dropout, cfg.attention_dropout, cfg.ffn_hidden_size, cfg.feature_dim) == (0.0, 0.0, 256, 16)
    assert cfg.activation_func is torch.nn.functional.silu


def one_line_error(exc_type, fn, *args, **kwargs) -> str:
    with pytest.raises(exc_type) as err:
        fn(*args, **kwargs)
    message = str(err.value)
    assert "\n" not in message, message
    return message


def test_missing_and_misplaced_fields_are_named():
    plain = TransformerConfig(num_layers=4, hidden_size=32, num_attention_heads=4)
    msg = one_line_error(ConfigError, megatron_based.build_model, plain, vocab_size=64, max_sequence_length=64)
    assert "a plain TransformerConfig needs layer_pattern=..." in msg and "e.g. layer_pattern='CLSC'" in msg
    msg = one_line_error(ConfigError, get_based_block_spec, plain, "CLSC")
    assert msg.startswith("get_based_block_spec needs a BasedConfig; this TransformerConfig lacks the BASED field(s) ")
    for name in ("conv_kernel_size", "feature_dim", "layer_pattern", "swa_window"):
        assert name in msg
    assert "as_based_config(config, layer_pattern=...)" in msg and "megatron_based.build_model" in msg
    msg = one_line_error(ConfigError, as_based_config, plain, layer_pattern="CLSC", swa_windw=8)
    assert "unknown BasedConfig field(s) ['swa_windw']" in msg
    msg = one_line_error(ConfigError, as_based_config, tiny_config("CLSA"), swa_window=8)
    assert msg == "config is already a BasedConfig: set swa_window on it rather than as keyword arguments"
    msg = one_line_error(ConfigError, as_based_config, plain, layer_pattern="CLS")
    assert "layer_pattern has 3 symbols but num_layers is 4" in msg


def _without_groups(rank, world):
    parallel_state.destroy_model_parallel()
    with pytest.raises(RuntimeError) as err:
        megatron_based.build_model(TransformerConfig(num_layers=1, hidden_size=32, num_attention_heads=4),
                                   layer_pattern="C", vocab_size=64, max_sequence_length=64)
    return str(err.value)


def test_uninitialised_groups_say_what_to_call():
    msg = run_distributed(_without_groups, 1)[0]
    assert "\n" not in msg
    assert msg.startswith("build_model needs Megatron's model-parallel groups: call "
                          "megatron_based.initialize_parallel(tensor_model_parallel_size=...) first")
    assert "parallel_state.initialize_model_parallel" in msg


def test_package_exports_the_entry_points():
    assert megatron_based.build_model is build_model
    assert megatron_based.get_based_block_spec is get_based_block_spec
    assert megatron_based.initialize_parallel is initialize_parallel
    assert megatron_based.BasedConfig is BasedConfig
    with pytest.raises(AttributeError, match="has no attribute 'nope'"):
        megatron_based.nope  # noqa: B018
