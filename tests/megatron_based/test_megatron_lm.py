"""megatron_based.model.megatron_lm: the --spec objects for Megatron-LM's pretrain_gpt.py build the same model as
megatron_based.build_model from the same YAML (names, shapes, and logits with the same weights), and a Megatron-LM
argument that disagrees with the YAML stops the build with one line naming the flag. The YAML's linears: key replaces
the mixers' linear layers; a bad entry stops the build with one line naming the key."""
from __future__ import annotations

import pytest
import torch

from tests.distributed import run_distributed

MODEL = dict(layer_pattern="CLSA", hidden_size=32, num_attention_heads=4, ffn_hidden_size=48, feature_dim=4,
             swa_window=5, conv_kernel_size=3, vocab_size=50, make_vocab_size_divisible_by=8, seq_length=16)


# The documented flags (docs/training.md) at this model's sizes, plus CPU-only ones (no fused kernels).
FLAGS = ["--spec", "megatron_based.model.megatron_lm", "based_layer", "--num-layers", "4", "--hidden-size", "32",
         "--num-attention-heads", "4", "--ffn-hidden-size", "48", "--seq-length", "16",
         "--max-position-embeddings", "16", "--position-embedding-type", "none", "--normalization", "RMSNorm",
         "--norm-epsilon", "1e-5", "--swiglu", "--disable-bias-linear", "--hidden-dropout", "0",
         "--attention-dropout", "0", "--init-method-std", "0.02", "--make-vocab-size-divisible-by", "8",
         "--micro-batch-size", "1", "--global-batch-size", "1", "--transformer-impl", "local",
         "--use-cpu-initialization", "--no-bias-swiglu-fusion", "--no-bias-dropout-fusion", "--no-persist-layer-norm",
         "--no-masked-softmax-fusion", "--no-gradient-accumulation-fusion", "--no-rope-fusion"]


def _megatron_lm(flags):
    """Megatron-LM's own argument parsing and TransformerConfig (what pretrain_gpt.py's gpt_builder receives)."""
    import os
    import sys
    from unittest import mock

    from megatron.training.arguments import core_transformer_config_from_args, parse_args, validate_args

    with mock.patch.object(sys, "argv", ["pretrain_gpt.py", *flags]), \
            mock.patch.dict(os.environ, {"WORLD_SIZE": "1", "RANK": "0"}):
        args = parse_args()
        validate_args(args)
    return args, core_transformer_config_from_args(args)


def _with(flag, value, flags=FLAGS):
    i = flags.index(flag)
    return flags[:i + 1] + [value] + flags[i + 2:]


def _gpt_model(args, config, layer_spec):
    """``GPTModel`` as Megatron-LM's gpt_builder builds it from its arguments and a --spec layer spec."""
    from megatron.core.models.gpt import GPTModel

    return GPTModel(config=config, transformer_layer_spec=layer_spec, vocab_size=56, max_sequence_length=16,
                    pre_process=True, post_process=True, parallel_output=True,
                    share_embeddings_and_output_weights=not args.untie_embeddings_and_output_weights,
                    position_embedding_type=args.position_embedding_type)


def _worker(rank, world, yaml_path):
    import os

    from megatron_based.model.config import model_spec_from_dict
    from megatron_based.model.megatron_lm import based_layer, based_layer_spec
    from megatron_based.model import build_model
    from megatron_based.runtime.parallel import initialize_parallel

    initialize_parallel(1)
    os.environ["BASED_SPEC_CONFIG"] = yaml_path
    spec = model_spec_from_dict(dict(MODEL))
    ours = build_model(spec.config, vocab_size=spec.vocab_size, max_sequence_length=16).eval()
    results = {}
    for name in ("called", "as_is"):
        args, config = _megatron_lm(FLAGS)
        assert args.spec == ["megatron_based.model.megatron_lm", "based_layer"]
        layer_spec = based_layer_spec(args, config, None) if name == "called" else based_layer
        lm = _gpt_model(args, config, layer_spec).eval()
        shapes = {k: tuple(v.shape) for k, v in lm.state_dict().items() if isinstance(v, torch.Tensor)}
        lm.load_state_dict(ours.state_dict(), strict=False)
        tokens = torch.randint(0, 50, (2, 11), generator=torch.Generator().manual_seed(1))
        pos = torch.arange(11).expand(2, 11)
        with torch.no_grad():
            err = (lm(tokens, pos, attention_mask=None) - ours(tokens, pos, attention_mask=None)).abs().max().item()
        results[name] = (shapes, err, [type(layer.self_attention).__name__ for layer in lm.decoder.layers])
    ours_shapes = {k: tuple(v.shape) for k, v in ours.state_dict().items() if isinstance(v, torch.Tensor)}
    return ours_shapes, results


def test_spec_builds_the_same_model_as_build_model(tmp_path):
    import yaml

    path = tmp_path / "model.yaml"
    path.write_text(yaml.safe_dump({"model": MODEL}))
    [(ours_shapes, results)] = run_distributed(_worker, 1, str(path))
    assert sum(torch.Size(s).numel() for s in ours_shapes.values()) > 20000
    for name, (shapes, err, mixers) in results.items():
        assert shapes == ours_shapes, name
        assert err < 1e-5, (name, err)
        assert mixers == ["BaseConv", "TaylorLinearAttention", "SlidingWindowAttention", "SoftmaxAttention"], name


def _bf16_worker(rank, world, yaml_path):
    import dataclasses
    import os

    from megatron_based.model import build_model
    from megatron_based.model.config import model_spec_from_dict
    from megatron_based.model.megatron_lm import based_layer, based_layer_spec
    from megatron_based.runtime.parallel import initialize_parallel

    initialize_parallel(1)
    os.environ["BASED_SPEC_CONFIG"] = yaml_path
    spec = model_spec_from_dict(dict(MODEL))
    cfg = dataclasses.replace(spec.config, params_dtype=torch.bfloat16, bf16=True, fp32_residual_connection=True)
    torch.manual_seed(0)
    ours = build_model(cfg, vocab_size=spec.vocab_size, max_sequence_length=16).eval()
    tokens = torch.randint(0, 50, (2, 11), generator=torch.Generator().manual_seed(1))
    pos = torch.arange(11).expand(2, 11)
    with torch.no_grad():
        want = ours(tokens, pos, attention_mask=None).double()
    results = {}
    for name in ("called", "as_is"):
        args, config = _megatron_lm(FLAGS + ["--bf16", "--fp32-residual-connection"])
        layer_spec = based_layer_spec(args, config, None) if name == "called" else based_layer
        lm = _gpt_model(args, config, layer_spec).to(torch.bfloat16)
        lm.load_state_dict(ours.state_dict(), strict=False)
        logits = lm(tokens, pos, attention_mask=None)
        logits.float().square().mean().backward()
        grads = all(p.grad is not None and torch.isfinite(p.grad).all() for p in lm.parameters())
        err = ((logits.detach().double() - want).norm() / want.norm()).item()
        results[name] = (logits.dtype, err, grads, type(lm.decoder.final_layernorm).__module__)
    return results


def test_spec_trains_in_bf16_with_an_fp32_residual(tmp_path):
    """--bf16 --fp32-residual-connection, as the documented command runs: Megatron's own final norm (``based_layer``
    as it is) returned fp32 for the fp32 residual and the output layer's bf16 matmul failed; the last layer now hands
    it the residual in bf16. Both spec forms run forward and backward (finite gradients for every parameter); their
    logits against build_model's bf16 model with the same weights: ``based_layer_spec`` (this project's final norm)
    equal, ``based_layer`` within one extra bf16 rounding of the final norm's input."""
    import yaml

    path = tmp_path / "model.yaml"
    path.write_text(yaml.safe_dump({"model": MODEL}))
    [results] = run_distributed(_bf16_worker, 1, str(path))
    dtype, err, grads, norm = results["called"]
    assert dtype == torch.bfloat16 and grads and norm == "megatron_based.model.norm" and err == 0, results
    dtype, err, grads, norm = results["as_is"]
    assert dtype == torch.bfloat16 and grads and norm.startswith("torch.") and 0 < err < 2e-2, results


def _checkpoint_worker(rank, world, yaml_path, ckpt_dir):
    import os

    from megatron.core import dist_checkpointing
    from megatron.training.checkpointing import _build_sharded_state_dict_metadata

    from megatron_based.model.megatron_lm import based_layer, based_layer_spec
    from megatron_based.runtime.parallel import initialize_parallel

    initialize_parallel(1)
    os.environ["BASED_SPEC_CONFIG"] = yaml_path
    results = {}
    for name in ("called", "as_is"):
        models = []
        for seed in (0, 1):
            args, config = _megatron_lm(FLAGS)
            torch.manual_seed(seed)
            models.append(_gpt_model(args, config, based_layer_spec(args, config, None) if name == "called"
                                     else based_layer))
        saved, loaded = models
        path = os.path.join(ckpt_dir, name)
        os.makedirs(path)
        # as Megatron-LM's save_checkpoint / load_checkpoint call them (its metadata, the torch_dist format)
        metadata = _build_sharded_state_dict_metadata(args)
        dist_checkpointing.save(saved.sharded_state_dict(metadata=metadata), path)
        want = {k: v for k, v in saved.state_dict().items() if isinstance(v, torch.Tensor)}
        differed = any(not torch.equal(want[k], v) for k, v in loaded.state_dict().items() if k in want)
        loaded.load_state_dict(dist_checkpointing.load(loaded.sharded_state_dict(metadata=metadata), path))
        got = loaded.state_dict()
        same = [k for k, v in want.items() if torch.equal(v, got[k])]
        results[name] = (differed, len(same), len(want),
                         sorted(k for k in saved.sharded_state_dict(metadata=metadata) if "linear_qkv.weight" in k))
    return results


def test_spec_model_saves_and_loads_a_megatron_lm_checkpoint(tmp_path):
    """Megatron-LM's torch_dist checkpoint of the --spec model: the layer pattern's mixers differ in shape, and
    Megatron's default stacking of a block's layers under one key per parameter name failed its sharding check at
    the first save (global shape (4, 96, 32) against (4, 64, 32) for linear_qkv); each layer is now its own entry,
    and a model with other weights loads the saved one back exactly."""
    import yaml

    path = tmp_path / "model.yaml"
    path.write_text(yaml.safe_dump({"model": MODEL}))
    (tmp_path / "ckpt").mkdir()
    [results] = run_distributed(_checkpoint_worker, 1, str(path), str(tmp_path / "ckpt"))
    for name, (differed, same, total, qkv_keys) in results.items():
        assert differed and same == total > 20, (name, same, total)
        assert qkv_keys == [f"decoder.layers.{i}.self_attention.linear_qkv.weight" for i in (1, 2, 3)], qkv_keys


def test_disagreeing_arguments_name_the_flags(tmp_path, monkeypatch):
    import yaml

    from megatron_based.model.config import ConfigError
    from megatron_based.model.megatron_lm import based_layer_spec

    path = tmp_path / "model.yaml"
    path.write_text(yaml.safe_dump({"model": MODEL}))
    monkeypatch.delenv("BASED_SPEC_CONFIG", raising=False)
    args, config = _megatron_lm(FLAGS)
    with pytest.raises(ConfigError, match="BASED_SPEC_CONFIG is not set"):
        based_layer_spec(args, config)
    monkeypatch.setenv("BASED_SPEC_CONFIG", str(path))
    flags = _with("--hidden-size", "64", _with("--position-embedding-type", "rope", _with("--hidden-dropout", "0.1")))
    flags.remove("--disable-bias-linear")
    with pytest.raises(ConfigError) as e:
        based_layer_spec(*_megatron_lm(flags))
    msg = str(e.value)
    assert "\n" not in msg
    assert msg.startswith(f"Megatron-LM's arguments disagree with BASED_SPEC_CONFIG={path}: --hidden-size 64 "
                          "(the YAML has 32); --hidden-dropout 0.1 (the YAML has 0.0); "
                          "--disable-bias-linear is not set")
    assert "--position-embedding-type none" in msg

    # the block's final norm is Megatron's: without Transformer Engine or apex (as here) torch's, which asserts
    # against Megatron-LM's default persist_layer_norm; the layers' build names the flag instead
    from megatron.core.transformer import transformer_block
    from megatron.core.transformer.torch_norm import WrappedTorchNorm

    if transformer_block.LayerNormImpl is WrappedTorchNorm:
        flags = list(FLAGS)
        flags.remove("--no-persist-layer-norm")
        with pytest.raises(ConfigError) as e:
            based_layer_spec(*_megatron_lm(flags))
        assert "\n" not in str(e.value) and str(e.value).endswith("refuses it: add --no-persist-layer-norm")


# Replacement linears for the YAML's linears: key, named by this module's import path; trivial subclasses, so the
# built layers show which class each submodule came from.
from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear  # noqa: E402


class TaggedColumnLinear(ColumnParallelLinear):
    pass


class TaggedRowLinear(RowParallelLinear):
    pass


LINEARS = {"L": {"linear_qkv": f"{__name__}:TaggedColumnLinear", "linear_proj": f"{__name__}.TaggedRowLinear"},
           "C": {"linear_in": f"{__name__}:TaggedColumnLinear"}}


def _linears_worker(rank, world, yaml_path):
    import os

    from megatron_based.model.megatron_lm import based_layer, based_layer_spec
    from megatron_based.runtime.parallel import initialize_parallel

    initialize_parallel(1)
    os.environ["BASED_SPEC_CONFIG"] = yaml_path
    results = {}
    for name in ("called", "as_is"):
        args, config = _megatron_lm(FLAGS)
        layer_spec = based_layer_spec(args, config, None) if name == "called" else based_layer
        lm = _gpt_model(args, config, layer_spec).eval()
        tokens = torch.randint(0, 50, (1, 7), generator=torch.Generator().manual_seed(1))
        with torch.no_grad():
            logits = lm(tokens, torch.arange(7)[None], attention_mask=None)
        results[name] = (bool(torch.isfinite(logits).all()),
                         [{sub: type(mod).__name__ for sub, mod in layer.self_attention.named_children()
                           if sub.startswith("linear")} for layer in lm.decoder.layers])
    return results


def test_yaml_linears_replace_the_mixers_linears(tmp_path):
    import yaml

    path = tmp_path / "model.yaml"
    path.write_text(yaml.safe_dump({"model": MODEL, "linears": LINEARS}))
    [results] = run_distributed(_linears_worker, 1, str(path))
    for name, (finite, linears) in results.items():
        assert finite, name
        # pattern C L S A: C's linear_in and L's two linears replaced; C's linear_out, S and A keep the defaults
        assert linears == [{"linear_in": "TaggedColumnLinear", "linear_out": "RowParallelLinear"},
                           {"linear_qkv": "TaggedColumnLinear", "linear_proj": "TaggedRowLinear"},
                           {"linear_qkv": "ColumnParallelLinear", "linear_proj": "RowParallelLinear"},
                           {"linear_qkv": "ColumnParallelLinear", "linear_proj": "RowParallelLinear"}], name


@pytest.mark.parametrize("linears, message", [
    ({"Q": {"linear_qkv": f"{__name__}:TaggedColumnLinear"}},
     "linears.Q: no mixer has the symbol 'Q'; use one of {registered}"),
    ({"L": {"linear_in": f"{__name__}:TaggedColumnLinear"}},
     "linears.L.linear_in: the L mixer (TaylorLinearAttention) has no submodule 'linear_in'; use one of "
     "linear_qkv, linear_proj"),
    ({"C": {"linear_in": "no_such_package.linears:Linear"}},
     "linears.C.linear_in: cannot import module 'no_such_package.linears' (ModuleNotFoundError: No module named "
     "'no_such_package'): fix the module path or install its package"),
    ({"S": {"linear_proj": f"{__name__}.NoSuchLinear"}},
     f"linears.S.linear_proj: module '{__name__}' has no 'NoSuchLinear': fix the class name"),
    ({"A": {"linear_qkv": f"{__name__}:LINEARS"}},
     f"linears.A.linear_qkv: '{__name__}:LINEARS' is a dict, not a class: name a linear layer class"),
], ids=["unknown-mixer", "unknown-submodule", "module-not-found", "no-such-class", "not-a-class"])
def test_bad_yaml_linears_name_the_key(tmp_path, monkeypatch, linears, message):
    import yaml

    from megatron_based.model.config import ConfigError
    from megatron_based.model.megatron_lm import based_layer_spec
    from megatron_based.model.mixers.registry import MIXERS

    path = tmp_path / "model.yaml"
    path.write_text(yaml.safe_dump({"model": MODEL, "linears": linears}))
    message = message.replace("{registered}", ", ".join(MIXERS))
    monkeypatch.setenv("BASED_SPEC_CONFIG", str(path))
    args, config = _megatron_lm(FLAGS)
    with pytest.raises(ConfigError) as e:  # from the spec function, before Megatron-LM builds any module
        based_layer_spec(args, config)
    assert str(e.value) == f"BASED_SPEC_CONFIG={path}: {message}"
