"""Checkpoint conversion: released <-> ours round trips exactly at TP 1 and 2, and our model after import computes
the same logits as a plain-PyTorch BASED written here from based-spec.md (fp64)."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from tests.distributed import run_distributed

VOCAB = 50  # padded to 56 (multiple of 8) in the released layout, to 64 at TP=2
PATTERN = "CLSC"
DIMS = dict(hidden_size=32, num_attention_heads=4, feature_dim=4, swa_window=5, conv_kernel_size=3,
            ffn_hidden_size=48)


def _config(tp: int = 1):
    from megatron_based.model.config import BasedConfig

    return BasedConfig(layer_pattern=PATTERN, tensor_model_parallel_size=tp, use_cpu_initialization=True, **DIMS)


def _random_released(seed: int = 0) -> dict:
    from megatron_based.inference.convert import released_shapes

    g = torch.Generator().manual_seed(seed)
    out = {}
    for name, shape in released_shapes(_config(), VOCAB).items():
        scale = 0.5 if "conv" in name else 0.2
        out[name] = (1 + 0.1 * torch.randn(shape, generator=g)) if "norm" in name or "ln_f" in name else \
            scale * torch.randn(shape, generator=g)
    return out


# -- an independent BASED forward in the released layout (based-spec.md), fp64 -----------------------------------
def _rms(x, w, eps=1e-5):
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * w


def _rope(x, base=10000.0):  # x [T, H, dh], rotate-half, absolute positions
    T, _, dh = x.shape
    inv = 1.0 / base ** (torch.arange(0, dh, 2, dtype=torch.float64) / dh)
    ang = torch.arange(T, dtype=torch.float64)[:, None] * inv
    cos, sin = torch.cat([ang.cos()] * 2, -1)[:, None], torch.cat([ang.sin()] * 2, -1)[:, None]
    x1, x2 = x.chunk(2, -1)
    return x * cos + torch.cat([-x2, x1], -1) * sin


def reference_logits(W: dict, tokens: torch.Tensor) -> torch.Tensor:
    """Logits ``[T, V]`` of one sequence: pre-norm blocks, C/L/S mixers and SwiGLU MLP as based-spec.md states."""
    W = {k: v.double() for k, v in W.items()}
    d, H, f, window = DIMS["hidden_size"], DIMS["num_attention_heads"], DIMS["feature_dim"], DIMS["swa_window"]
    dh = d // H
    T = tokens.numel()
    causal = torch.ones(T, T, dtype=torch.bool).tril()
    x = W["transformer.embeddings.word_embeddings.weight"][tokens]
    for i, mixer in enumerate(PATTERN):
        p = f"transformer.layers.{i}."
        h = _rms(x, W[p + "norm1.weight"])
        if mixer == "C":
            u = h @ W[p + "mixer.in_proj.weight"].T + W[p + "mixer.in_proj.bias"]
            u1, u2 = u[:, : 2 * d], u[:, 2 * d:]
            w = W[p + "mixer.conv.conv.weight"][:, 0]  # [2d, k]; tap k-1 is the current token
            k = w.shape[1]
            c = torch.zeros_like(u1)
            for t in range(T):
                for j in range(k):
                    if t - (k - 1) + j >= 0:
                        c[t] += w[:, j] * u1[t - (k - 1) + j]
            y = (F.silu(c) * u2) @ W[p + "mixer.out_proj.weight"].T + W[p + "mixer.out_proj.bias"]
        elif mixer == "L":
            q = (h @ W[p + "mixer.proj_q.weight"].T).view(T, H, f).transpose(0, 1)
            kk = (h @ W[p + "mixer.proj_k.weight"].T).view(T, H, f).transpose(0, 1)
            v = (h @ W[p + "mixer.proj_v.weight"].T).view(T, H, dh).transpose(0, 1)
            s = q @ kk.transpose(1, 2) / math.sqrt(f)
            a = (1 + s + s * s / 2) * causal
            o = (a @ v) / (a.sum(-1, keepdim=True) + 1e-12)
            y = o.transpose(0, 1).reshape(T, d) @ W[p + "mixer.out_proj.weight"].T
        else:  # S: Wqkv rows are [all Q | all K | all V]
            q, kk, v = (h @ W[p + "mixer.Wqkv.weight"].T).view(T, 3, H, dh).unbind(1)
            q, kk = _rope(q), _rope(kk)
            scores = torch.einsum("thd,shd->hts", q, kk) / math.sqrt(dh)
            pos = torch.arange(T)
            visible = causal & (pos[None, :] >= pos[:, None] - window)
            o = torch.einsum("hts,shd->thd", scores.masked_fill(~visible, -math.inf).softmax(-1), v)
            y = o.reshape(T, d) @ W[p + "mixer.out_proj.weight"].T
        x = x + y
        a = _rms(x, W[p + "norm2.weight"]) @ W[p + "mlp.fc1.weight"].T
        value, gate = a.chunk(2, -1)  # the released fc1 output is [value | gate]
        x = x + (value * F.silu(gate)) @ W[p + "mlp.fc2.weight"].T
    x = _rms(x, W["transformer.ln_f.weight"])
    return x @ W["transformer.embeddings.word_embeddings.weight"].T


# -- tests ------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("tp", [1, 2, 4])
def test_round_trip_released_ours_released_is_identical(tp):
    from megatron_based.inference.convert import megatron_to_released, released_to_megatron

    released = _random_released()
    shards = released_to_megatron(released, _config(), vocab_size=VOCAB, tensor_model_parallel_size=tp)
    assert len(shards) == tp
    assert shards[0]["embedding.word_embeddings.weight"].shape == (64 // tp if tp > 1 else 56, 32)
    back = megatron_to_released(shards, _config(), vocab_size=VOCAB)
    assert back.keys() == released.keys()
    for name, t in released.items():
        assert torch.equal(back[name], t), name


def test_layouts_of_converted_tensors():
    """Spot checks of the layout differences, by value."""
    from megatron_based.inference.convert import released_to_megatron

    W = _random_released()
    ours = released_to_megatron(W, _config(), vocab_size=VOCAB, tensor_model_parallel_size=2)
    d, f, dh = 32, 4, 8
    # S (layer 2), rank 1 holds heads 2, 3; its first rows are q of head 2, then k of head 2.
    wqkv = W["transformer.layers.2.mixer.Wqkv.weight"]
    s_qkv = ours[1]["decoder.layers.2.self_attention.linear_qkv.weight"]
    assert torch.equal(s_qkv[:dh], wqkv[2 * dh: 3 * dh])
    assert torch.equal(s_qkv[dh: 2 * dh], wqkv[d + 2 * dh: d + 3 * dh])
    # L (layer 1), rank 0, head 1: [q_1 (f) | k_1 (f) | v_1 (dh)] after head 0's 2f + dh rows.
    l_qkv = ours[0]["decoder.layers.1.self_attention.linear_qkv.weight"]
    assert torch.equal(l_qkv[2 * f + dh: 3 * f + dh], W["transformer.layers.1.mixer.proj_q.weight"][f: 2 * f])
    # MLP fc1, rank 1: [gate_1 | value_1] = released [value | gate] halves swapped, second quarter of each.
    fc1 = W["transformer.layers.0.mlp.fc1.weight"]
    n = 48
    assert torch.equal(ours[1]["decoder.layers.0.mlp.linear_fc1.weight"][: n // 2], fc1[n + n // 2:])
    # C in_proj stride 2: rank 1 holds [u1 second half | u2 second half]; conv weight squeezed.
    w_in = W["transformer.layers.0.mixer.in_proj.weight"]
    assert torch.equal(ours[1]["decoder.layers.0.self_attention.linear_in.weight"][: d], w_in[d: 2 * d])
    assert ours[0]["decoder.layers.0.self_attention.conv_weight"].shape == (d, 3)


def test_mismatches_name_the_tensor_and_both_shapes():
    from megatron_based.inference.convert import ConversionError, megatron_to_released, released_to_megatron

    W = _random_released()
    cfg = _config()
    bad = dict(W)
    bad["transformer.layers.2.mixer.Wqkv.weight"] = torch.zeros(95, 32)
    with pytest.raises(ConversionError, match=r"Wqkv\.weight has shape \(95, 32\), expected \(96, 32\)"):
        released_to_megatron(bad, cfg, vocab_size=VOCAB)
    missing = {k: v for k, v in W.items() if k != "transformer.layers.1.mixer.proj_k.weight"}
    with pytest.raises(ConversionError, match=r"proj_k\.weight is missing \(expected shape \(16, 32\)\)"):
        released_to_megatron(missing, cfg, vocab_size=VOCAB)
    with pytest.raises(ConversionError, match=r"unexpected tensor\(s\): transformer\.layers\.9\.x \(3,\)"):
        released_to_megatron({**W, "transformer.layers.9.x": torch.zeros(3)}, cfg, vocab_size=VOCAB)
    with pytest.raises(ConversionError, match="lm_head.weight"):
        released_to_megatron({**W, "lm_head.weight": torch.zeros(56, 32)}, cfg, vocab_size=VOCAB)
    released_to_megatron({**W, "lm_head.weight": W["transformer.embeddings.word_embeddings.weight"]}, cfg,
                         vocab_size=VOCAB)  # a tied head is accepted
    shards = released_to_megatron(W, cfg, vocab_size=VOCAB, tensor_model_parallel_size=2)
    shards[1]["decoder.layers.3.self_attention.conv_weight"] = torch.zeros(32, 2)
    with pytest.raises(ConversionError, match=r"TP rank 1 of 2.*conv_weight has shape \(32, 2\), expected \(32, 3\)"):
        megatron_to_released(shards, cfg, vocab_size=VOCAB)


def _logits_worker(rank, world, tmp):
    from megatron.core.tensor_parallel import gather_from_tensor_model_parallel_region

    from megatron_based.model.config import ModelSpec
    from megatron_based.inference.convert import megatron_to_released, released_to_megatron
    from megatron_based.inference.loader import load_into_model
    from megatron_based.model import build_model
    from megatron_based.runtime.parallel import initialize_parallel

    initialize_parallel(world)
    W = _random_released()
    cfg = _config(world)
    model = build_model(cfg, vocab_size=VOCAB, max_sequence_length=64).eval()
    model.load_state_dict(released_to_megatron(W, cfg, vocab_size=VOCAB, tensor_model_parallel_size=world)[rank],
                          strict=False)
    tokens = torch.randint(0, VOCAB, (2, 13), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        logits = gather_from_tensor_model_parallel_region(model(tokens, torch.arange(13).expand(2, 13),
                                                                attention_mask=None))
    # Export from this TP layout back to the released one, and load a released file through load_into_model.
    shard_list = [None] * world
    torch.distributed.all_gather_object(shard_list, {k: v for k, v in model.state_dict().items()
                                                     if isinstance(v, torch.Tensor)})
    exported = megatron_to_released(shard_list, cfg, vocab_size=VOCAB)
    other = build_model(cfg, vocab_size=VOCAB, max_sequence_length=64).eval()
    load_into_model(other, tmp, ModelSpec(config=cfg, vocab_size=VOCAB))
    same = all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), other.state_dict().values())
               if isinstance(a, torch.Tensor))
    # numpy, not a tensor: torch would pass the storage as a file descriptor that dies with this worker
    return logits[..., :VOCAB].double().numpy(), all(torch.equal(exported[k], W[k]) for k in W), same


@pytest.mark.parametrize("world", [1, 2])
def test_logits_after_import_equal_plain_pytorch_reference(world, tmp_path):
    from megatron_based.inference.convert import write_tensors

    W = _random_released()
    path = tmp_path / "released.safetensors"
    write_tensors(W, path)
    tokens = torch.randint(0, VOCAB, (2, 13), generator=torch.Generator().manual_seed(5))
    want = torch.stack([reference_logits(W, tokens[b])[:, :VOCAB] for b in range(2)])
    assert want.abs().max() > 0.5
    for logits, exported_ok, loaded_ok in run_distributed(_logits_worker, world, str(path)):
        torch.testing.assert_close(torch.from_numpy(logits), want, rtol=1e-4, atol=1e-4)
        assert exported_ok and loaded_ok


# -- the files as published --------------------------------------------------------------------------------------
# The released pytorch_model.bin files are the authors' training-module state dict: names under `model.`, training
# counters beside the weights, and (fixed_decay: True, based-1b) an unused `transformer.decay.decay` [heads] buffer.
# The names and shapes below are written from the authors' module names (based-spec.md, "Checkpoint layout"), not
# from the converter's table, so that the two are checked against each other.
def _published_names(d=32, heads=4, f=4, k=3, n=48, rows=56) -> dict:
    C = {"mixer.in_proj.weight": (4 * d, d), "mixer.in_proj.bias": (4 * d,), "mixer.conv.conv.weight": (2 * d, 1, k),
         "mixer.out_proj.weight": (d, 2 * d), "mixer.out_proj.bias": (d,)}
    L = {"mixer.proj_q.weight": (heads * f, d), "mixer.proj_k.weight": (heads * f, d),
         "mixer.proj_v.weight": (d, d), "mixer.out_proj.weight": (d, d)}
    S = {"mixer.Wqkv.weight": (3 * d, d), "mixer.out_proj.weight": (d, d)}
    names = {"model.transformer.embeddings.word_embeddings.weight": (rows, d)}
    for i, mixer in enumerate("CLSC"):
        block = {"norm1.weight": (d,), "norm2.weight": (d,), "mlp.fc1.weight": (2 * n, d),
                 "mlp.fc2.weight": (d, n), **{"C": C, "L": L, "S": S}[mixer]}
        names.update({f"model.transformer.layers.{i}.{name}": s for name, s in block.items()})
    names["model.transformer.ln_f.weight"] = (d,)
    names["model.transformer.decay.decay"] = (heads,)
    names["train_metrics.num-tokens.count"] = ()
    names["val_metrics.num-tokens.count"] = ()
    return names


def _published(prefix: str = "model.") -> dict:
    """A published-style state dict with random weights, its tied head as the same tensor (as torch.save keeps it)."""
    g = torch.Generator().manual_seed(3)
    out = {}
    for name, shape in _published_names().items():
        out[name.replace("model.", prefix, 1) if name.startswith("model.") else name] = \
            torch.randn(shape, generator=g) if "metrics" not in name else torch.tensor(4096.0)
    out[prefix + "lm_head.weight"] = out[prefix + "transformer.embeddings.word_embeddings.weight"]
    return out


def _write_published(tensors: dict, path):
    if path.suffix == ".safetensors":
        from safetensors.torch import save_file

        save_file({k: v.clone() for k, v in tensors.items()}, str(path))  # safetensors refuses shared storage
    else:
        torch.save(tensors, path)


@pytest.mark.parametrize("filename", ["pytorch_model.bin", "model.safetensors"])
@pytest.mark.parametrize("prefix", ["model.", ""])
def test_published_file_imports_and_reports_what_it_drops(filename, prefix, tmp_path):
    from megatron_based.inference.convert import (megatron_to_released, read_tensors, released_shapes,
                                                  released_to_megatron)

    published = _published(prefix)
    path = tmp_path / filename
    _write_published(published, path)
    lines = []
    shards = released_to_megatron(read_tensors(path), _config(), vocab_size=VOCAB, tensor_model_parallel_size=2,
                                  report=lines.append)
    dropped = sorted([f"{prefix}transformer.decay.decay (4,)", "train_metrics.num-tokens.count ()",
                      "val_metrics.num-tokens.count ()"])
    assert lines == ["skipped 3 entries the model does not use: " + ", ".join(dropped)]
    weights = {n[len(prefix):]: t for n, t in published.items()
               if n.startswith(prefix + "transformer.") and "decay" not in n}
    assert weights.keys() == released_shapes(_config(), VOCAB).keys()  # the published names are the converter's
    back = megatron_to_released(shards, _config(), vocab_size=VOCAB)
    assert back.keys() == weights.keys()
    for name, t in weights.items():
        assert torch.equal(back[name], t), name


def test_published_file_unknown_names_stay_errors():
    from megatron_based.inference.convert import ConversionError, released_to_megatron

    with pytest.raises(ConversionError, match=r"unexpected tensor\(s\): transformer\.layers\.0\.mixer\.gate\.weight"):
        released_to_megatron({**_published(), "model.transformer.layers.0.mixer.gate.weight": torch.zeros(2)},
                             _config(), vocab_size=VOCAB, report=None)
    both = {**_published(), "transformer.ln_f.weight": torch.ones(32)}
    with pytest.raises(ConversionError, match=r"transformer\.ln_f\.weight is there both with and without"):
        released_to_megatron(both, _config(), vocab_size=VOCAB, report=None)


def test_convert_command_imports_pytorch_model_bin(tmp_path, capsys):
    import yaml

    from megatron_based.inference.cli import convert_main as main
    from megatron_based.inference.convert import rank_file, read_tensors, released_to_megatron

    cfg = tmp_path / "model.yaml"
    cfg.write_text(yaml.safe_dump({"model": {"layer_pattern": PATTERN, "vocab_size": VOCAB, **DIMS}}))
    published = _published()
    _write_published(published, tmp_path / "pytorch_model.bin")
    assert main(["import", "--config", str(cfg), "--input", str(tmp_path / "pytorch_model.bin"),
                 "--output", str(tmp_path / "out"), "--tensor-model-parallel-size", "2"]) == 0
    out = capsys.readouterr().out
    assert "skipped 3 entries the model does not use: model.transformer.decay.decay (4,)" in out
    want = released_to_megatron(published, _config(), vocab_size=VOCAB, tensor_model_parallel_size=2, report=None)
    for r in range(2):
        got = read_tensors(rank_file(tmp_path / "out", r))
        assert got.keys() == want[r].keys()
        assert all(torch.equal(got[k], want[r][k]) for k in got)


def _bf16_load_worker(rank, world, config, weights):
    from megatron_based.inference.loader import load_model
    from megatron_based.runtime.parallel import initialize_parallel

    initialize_parallel(1)
    model, _ = load_model(config, weights, dtype="bf16")
    return model.config.fp32_residual_connection, str(model.decoder.final_layernorm.weight.dtype)


def test_imported_released_weights_run_with_the_fp32_residual(tmp_path, capsys):
    """Released weights loaded in bf16 get the released models' fp32 residual stream (BasedConfig's default for
    bf16; configs/based-*.yaml also say so); ``convert import`` warns when a config turns it off."""
    import yaml

    from megatron_based.inference.cli import convert_main as main
    from megatron_based.inference.convert import write_tensors

    weights = tmp_path / "released.safetensors"
    write_tensors(_random_released(), weights)
    cfg = tmp_path / "model.yaml"
    cfg.write_text(yaml.safe_dump({"model": {"layer_pattern": PATTERN, "vocab_size": VOCAB, **DIMS}}))
    assert run_distributed(_bf16_load_worker, 1, str(cfg), str(weights))[0] == (True, "torch.bfloat16")
    assert main(["import", "--config", str(cfg), "--input", str(weights), "--output", str(tmp_path / "a")]) == 0
    assert "fp32_residual_connection" not in capsys.readouterr().err
    off = tmp_path / "off.yaml"
    off.write_text(yaml.safe_dump({"model": {"layer_pattern": PATTERN, "vocab_size": VOCAB, **DIMS,
                                             "fp32_residual_connection": False}}))
    assert main(["import", "--config", str(off), "--input", str(weights), "--output", str(tmp_path / "b")]) == 0
    assert "sets fp32_residual_connection: false" in capsys.readouterr().err


def _graphs_config_worker(rank, world, config):
    from megatron_based.inference.loader import load_model
    from megatron_based.runtime.parallel import initialize_parallel

    initialize_parallel(1)
    model, spec = load_model(config, None)
    return model.config.cuda_graph_impl, spec.config.cuda_graph_impl


def test_a_run_trained_with_cuda_graphs_loads_for_inference(tmp_path):
    """``cuda_graph_impl: local`` (Megatron's per-layer training graphs) in a config or a checkpoint's saved run
    configuration is not how inference builds: generate / eval / the demo build the model without it (on the GPU
    Megatron's graph manager otherwise asserts on the inference RNG tracker; on CPU the config is rejected)."""
    import yaml

    cfg = tmp_path / "model.yaml"
    cfg.write_text(yaml.safe_dump({"model": {"layer_pattern": PATTERN, "vocab_size": VOCAB, "cuda_graph_impl": "local",
                                             **DIMS}}))
    assert run_distributed(_graphs_config_worker, 1, str(cfg))[0] == ("none", "none")
