"""Checkpoints: atomic saves (``latest`` never names a partial one), corrupted / truncated files named in the error,
no arbitrary unpickling, and TP=2 -> TP=1 resharding with the same logits."""
from __future__ import annotations

import os
import pickle
import shutil
from pathlib import Path

import pytest
import torch

from megatron_based import checkpointing
from megatron_based.checkpointing import CheckpointError

from ..distributed import run_distributed
from .test_data import corpus  # noqa: F401 - the session fixture
from .test_train import by_value, forked, from_bytes, ok, tiny_config


@pytest.fixture(scope="module")
def tp2_run(tmp_path_factory, corpus):  # noqa: F811
    """Two steps at TP=2 (2 gloo ranks), saved; returns the checkpoint and the full-vocabulary logits of a batch."""
    tmp = tmp_path_factory.mktemp("tp2")
    cfg = tiny_config(tmp, corpus, ["parallel.tensor_model_parallel_size=2", "parallel.sequence_parallel=true",
                                    "train.train_steps=2", "train.lr_warmup_steps=1", f"train.save={tmp}/ckpt"],
                      world_size=2)
    results = run_distributed(_tp2_worker, 2, cfg)
    return tmp / "ckpt", from_bytes(results[0])


def _batch():
    g = torch.Generator().manual_seed(0)
    return torch.randint(0, 500, (2, 32), generator=g)


def _tp2_worker(rank, world_size, cfg):
    from megatron_based.sample import full_logits

    logits = {}

    def hook(step, loss, model):
        if step == cfg.train.train_steps:
            model.eval()
            logits["full"] = full_logits(model.module, _batch())

    from megatron_based.train import train

    train(cfg, step_hook=hook)
    return by_value(logits["full"])


def _load_tp1(path):
    from megatron_based.parallel import initialize_parallel
    from megatron_based.sample import full_logits, load_for_inference

    initialize_parallel(1, 1, 1)
    model, spec, tokenizer = load_for_inference(path)
    return full_logits(model, _batch()), tokenizer.vocab_size


def test_tp2_checkpoint_loads_at_tp1_with_the_same_logits(tp2_run):
    ckpt, logits_tp2 = tp2_run
    logits_tp1, vocab = ok(forked(_load_tp1, str(ckpt)))
    assert logits_tp1.shape == logits_tp2.shape == (2, 32, 512) and vocab == 512
    torch.testing.assert_close(logits_tp1, logits_tp2, rtol=1e-5, atol=1e-5)
    assert logits_tp1.std() > 0.1  # trained weights, not a fresh init


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def test_latest_never_names_an_interrupted_save(tp2_run, tmp_path):
    ckpt = _copy(tp2_run[0], tmp_path / "ckpt")
    # A save killed mid-write leaves a .tmp- folder; one killed before the rename leaves no manifest anywhere.
    (ckpt / ".tmp-step_00000003").mkdir()
    (ckpt / ".tmp-step_00000003" / "__0_0.distcp").write_bytes(b"partial")
    assert checkpointing.resolve("latest", str(ckpt)).name == "step_00000002"
    partial = ckpt / "step_00000004"
    shutil.copytree(ckpt / "step_00000002", partial)
    (partial / "manifest.json").unlink()
    with pytest.raises(CheckpointError, match=r"step_00000004/manifest.json is missing: .* not a complete checkpoint"):
        checkpointing.verify(partial)


@pytest.mark.parametrize("damage", ["truncate", "flip", "delete"])
def test_corrupted_checkpoint_names_the_file(tp2_run, tmp_path, damage):
    path = _copy(tp2_run[0] / "step_00000002", tmp_path / "step")
    checkpointing.verify(path)
    victim = max((p for p in path.iterdir() if p.suffix == ".distcp"), key=lambda p: p.stat().st_size)
    data = victim.read_bytes()
    if damage == "truncate":
        victim.write_bytes(data[: len(data) // 2])
        match = rf"{victim.name} has {len(data) // 2} bytes, {len(data)} were written"
    elif damage == "flip":
        victim.write_bytes(data[:100] + bytes([data[100] ^ 1]) + data[101:])
        match = rf"{victim.name} is corrupted \(CRC32 differs"
    else:
        victim.unlink()
        match = rf"{victim.name} is missing"
    with pytest.raises(CheckpointError, match=match):
        checkpointing.verify(path)


class _Exploit:
    def __reduce__(self):
        return (os.system, (f"touch {_Exploit.marker}",))


@pytest.mark.parametrize("target", [".metadata", "run_config.yaml"])
def test_loading_never_unpickles_arbitrary_objects(tp2_run, tmp_path, target):
    """A pickled callable planted in torch's ``.metadata`` pickle (with a matching manifest, so only the unpickling
    can stop it) fails with an error naming the file, and never runs; YAML is read with ``safe_load``."""
    import json
    import zlib

    path = _copy(tp2_run[0] / "step_00000002", tmp_path / "step")
    _Exploit.marker = tmp_path / "pwned"
    victim = path / target
    if target == ".metadata":
        victim.write_bytes(pickle.dumps(_Exploit()))
    else:
        victim.write_text(victim.read_text() + "exploit: !!python/object/apply:os.system [touch %s]\n" % _Exploit.marker)
    manifest = json.loads((path / "manifest.json").read_text())
    manifest["files"][target] = {"bytes": victim.stat().st_size, "crc32": zlib.crc32(victim.read_bytes())}
    (path / "manifest.json").write_text(json.dumps(manifest))
    code, status, payload = forked(_load_tp1, str(path))
    assert status == "error" and target in payload, payload
    assert not _Exploit.marker.exists()
