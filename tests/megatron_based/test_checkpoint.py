"""Checkpoints: atomic saves (``latest`` never names a partial one), corrupted / truncated files named in the error,
no arbitrary unpickling, and TP=2 -> TP=1 resharding with the same logits."""
from __future__ import annotations

import io
import json
import os
import pickle
import re
import shutil
import zlib
from pathlib import Path

import pytest
import torch
from torch.distributed.checkpoint import FileSystemReader

from megatron_based.training import checkpointing
from megatron_based.training.checkpointing import CheckpointError

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
    from megatron_based.inference.sample import full_logits

    logits = {}

    def hook(step, loss, model):
        if step == cfg.train.train_steps:
            model.eval()
            logits["full"] = full_logits(model.module, _batch())

    from megatron_based.training.loop import train

    train(cfg, step_hook=hook)
    return by_value(logits["full"])


def _load_tp1(path):
    from megatron_based.runtime.parallel import initialize_parallel
    from megatron_based.inference.loader import load_for_inference
    from megatron_based.inference.sample import full_logits

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
    """Unpickling it runs ``touch marker``."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _record(path: Path, name: str, data: bytes) -> None:
    """Write ``path/name`` and record it in the manifest as a save would, so only the loader's own checks stand in
    the way."""
    (path / name).write_bytes(data)
    manifest = json.loads((path / "manifest.json").read_text())
    manifest["files"][name] = {"bytes": len(data), "crc32": zlib.crc32(data)}
    (path / "manifest.json").write_text(json.dumps(manifest))


@pytest.mark.parametrize("target", [".metadata", "run_config.yaml"])
def test_loading_never_unpickles_arbitrary_objects(tp2_run, tmp_path, target):
    """A pickled callable planted in torch's ``.metadata`` pickle (with a matching manifest, so only the unpickling
    can stop it) fails with an error naming the file, and never runs; YAML is read with ``safe_load``."""
    path = _copy(tp2_run[0] / "step_00000002", tmp_path / "step")
    marker = tmp_path / "pwned"
    if target == ".metadata":
        _record(path, target, pickle.dumps(_Exploit(marker)))
    else:
        text = (path / target).read_text() + "exploit: !!python/object/apply:os.system [touch %s]\n" % marker
        _record(path, target, text.encode())
    code, status, payload = forked(_load_tp1, str(path))
    assert status == "error" and target in payload, payload
    assert not marker.exists()


def _short_str(text: str) -> bytes:
    data = text.encode()
    return b"\x8c" + bytes([len(data)]) + data  # SHORT_BINUNICODE


def _stack_global_metadata(path: Path, marker: Path) -> None:
    """``.metadata`` that calls ``os.system`` found through the module torch's metadata classes live in
    (``STACK_GLOBAL`` with the dotted name ``os.system``), then unpickles to the genuine metadata: plain pickle runs
    the payload and the load goes on as if nothing happened."""
    payload = (b"\x80\x04" + _short_str("torch.distributed.checkpoint.metadata") + _short_str("os.system") + b"\x93"
               + _short_str(f"touch {marker}") + b"\x85R0")  # STACK_GLOBAL, TUPLE1, REDUCE, POP
    _record(path, ".metadata", payload + (path / ".metadata").read_bytes())


def _stored_object(path: Path, key: str, marker: Path) -> None:
    """Replace the stored object whose key contains ``key`` (Megatron's common state, a module's ``_extra_state``)
    by its genuine content plus an :class:`_Exploit`, appended to its ``.distcp`` file; ``.metadata`` points at it."""
    from torch.distributed.checkpoint.filesystem import _StorageInfo
    from torch.distributed.checkpoint.metadata import BytesStorageMetadata

    metadata = checkpointing._read_metadata(path)
    index, info = next((i, s) for i, s in metadata.storage_data.items() if key in i.fqn
                       and isinstance(metadata.state_dict_metadata[i.fqn], BytesStorageMetadata))
    shard = path / info.relative_path
    data = shard.read_bytes()
    genuine = torch.load(io.BytesIO(data[info.offset: info.offset + info.length]), weights_only=True)
    buf = io.BytesIO()
    torch.save(genuine + [_Exploit(marker)], buf)
    metadata.storage_data[index] = _StorageInfo(info.relative_path, len(data), len(buf.getvalue()))
    _record(path, info.relative_path, data + buf.getvalue())
    _record(path, ".metadata", pickle.dumps(metadata))


def _common_pt(path: Path, marker: Path | None) -> None:
    """A legacy ``common.pt``, which Megatron loads instead of the saved common state whenever it exists: the training
    state of another run (step 7) or, with ``marker``, an :class:`_Exploit`. Listed in the manifest only with one."""
    buf = io.BytesIO()
    torch.save({"state": {"step": 7}} if marker is None else {"state": _Exploit(marker)}, buf)
    if marker is None:
        (path / "common.pt").write_bytes(buf.getvalue())
    else:
        _record(path, "common.pt", buf.getvalue())


def _load_tp1_unverified(path):
    """:func:`_load_tp1` as if the files had changed after :func:`checkpointing.verify` checked them: what torch and
    Megatron unpickle on their own must be restricted too."""
    checkpointing.verify = lambda p: json.loads((p / "manifest.json").read_text())
    return _load_tp1(path)


_STORED_REFUSED = (r"a stored object holds objects other than plain data, refused \(UnpicklingError: Trying to load "
                   r"unsupported GLOBAL posix\.system whose module posix is blocked\.\)")
# target -> (build the crafted files, verify's error after the file's path (None: a listed common.pt is first read,
# and refused, by Megatron's torch.load), how the unpickling in torch / Megatron refuses it)
_CRAFTED = {
    ".metadata": (_stack_global_metadata, r"\.metadata holds objects other than checkpoint metadata; refusing to "
                  r"unpickle it \(UnpicklingError: torch\.distributed\.checkpoint\.metadata\.os\.system is not "
                  r"checkpoint metadata\)", r"\.metadata holds objects other than plain data, refused \(UnpicklingError: "
                  r"torch\.distributed\.checkpoint\.metadata\.os\.system is not checkpoint metadata\)"),
    "common_state": (lambda p, m: _stored_object(p, "common_state", m),
                     r"__\d+_\d+\.distcp stores common_state/shard_\d+_\d+ as objects other than plain data; "
                     r"refusing to unpickle it \(UnpicklingError: .*GLOBAL posix\.system.*\)", _STORED_REFUSED),
    "_extra_state": (lambda p, m: _stored_object(p, "_extra_state", m),
                     r"__\d+_\d+\.distcp stores decoder\.layers\.\S+\._extra_state/shard_\d+_\d+ as objects other "
                     r"than plain data; refusing to unpickle it \(UnpicklingError: .*GLOBAL posix\.system.*\)",
                     _STORED_REFUSED),
    "common.pt": (_common_pt, None, r"common\.pt holds objects other than plain data, refused \(UnpicklingError: "
                  r"Trying to load unsupported GLOBAL posix\.system whose module posix is blocked\.\)"),
}


def _error_line(payload: str) -> str:
    """The error of a forked run (its first line), checked to be all of the message: the traceback follows."""
    first, second = payload.split("\n")[:2]
    assert second.startswith("Traceback"), payload
    return first


@pytest.mark.parametrize("target,checked_by", [(t, "verify") for t in _CRAFTED if _CRAFTED[t][1]]
                         + [(t, "reader") for t in _CRAFTED])
def test_crafted_checkpoints_run_no_code(tp2_run, tmp_path, monkeypatch, target, checked_by):
    """Each crafted file of issue 17, with the manifest recomputed so the CRC check passes: verify refuses it with a
    one-line error naming the file and what it holds; with verify bypassed (a file changed after the check), the
    unpickling inside torch / Megatron refuses it, even where a user set torch's switch for unsafe loads by default.
    The payload never runs; unpickled freely, it does."""
    build, verify_match, reader_match = _CRAFTED[target]
    monkeypatch.setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")
    path = _copy(tp2_run[0] / "step_00000002", tmp_path / "step")
    marker = tmp_path / "pwned"
    build(path, marker)
    code, status, payload = forked(_load_tp1 if checked_by == "verify" else _load_tp1_unverified, str(path))
    assert status == "error", payload
    if checked_by == "verify":
        assert re.fullmatch(rf"CheckpointError: checkpoint file {re.escape(str(path))}/{verify_match}.*",
                            _error_line(payload)), payload
    else:
        assert re.fullmatch(rf"CheckpointError: checkpoint {re.escape(str(path))} could not be loaded: "
                            rf"{reader_match}", _error_line(payload)), payload
    assert not marker.exists()
    # the crafted file is a working exploit: torch's reader, unrestricted, runs it
    fsr = FileSystemReader(str(path))
    if target == "common.pt":
        torch.load(path / "common.pt", weights_only=False)
    else:
        fsr.read_metadata()  # plain pickle.load
    if target in ("common_state", "_extra_state"):
        from torch.distributed.checkpoint.metadata import MetadataIndex

        metadata = fsr.read_metadata()
        fqn = next(k for k in metadata.state_dict_metadata if target in k)
        info = metadata.storage_data[MetadataIndex(fqn)]
        with (path / info.relative_path).open("rb") as f:
            f.seek(info.offset)
            torch.load(io.BytesIO(f.read(info.length)), weights_only=False)
    assert marker.exists()


def test_unlisted_common_pt_is_refused(tp2_run, tmp_path):
    """A ``common.pt`` the manifest does not list (Megatron would load it in place of the saved state and resume at
    its step) is named and refused; nothing else in the checkpoint changed."""
    path = _copy(tp2_run[0] / "step_00000002", tmp_path / "step")
    _common_pt(path, None)
    code, status, payload = forked(_load_tp1, str(path))
    assert status == "error", payload
    assert _error_line(payload) == (f"CheckpointError: checkpoint file {path}/common.pt is not listed in "
                                    f"{path}/manifest.json; a checkpoint holds only the files it was saved with: "
                                    "remove it, or load another checkpoint")
    (path / "common.pt").unlink()
    assert checkpointing.verify(path)["step"] == 2


def test_metadata_points_only_into_listed_files(tp2_run, tmp_path):
    """``.metadata`` placing a shard in a file outside the manifest (here outside the directory) is refused."""
    path = _copy(tp2_run[0] / "step_00000002", tmp_path / "step")
    metadata = checkpointing._read_metadata(path)
    index = next(iter(metadata.storage_data))
    metadata.storage_data[index].relative_path = "../elsewhere.distcp"
    _record(path, ".metadata", pickle.dumps(metadata))
    with pytest.raises(CheckpointError, match=rf"\.metadata places {re.escape(index.fqn)} in '\.\./elsewhere\.distcp', "
                                              r"which manifest\.json does not list"):
        checkpointing.verify(path)


def test_released_file_with_code_is_refused(tmp_path):
    """A torch file for ``megatron-based-convert`` / ``generate`` holding a pickled callable: refused by name."""
    from megatron_based.inference.convert import ConversionError, read_tensors

    marker = tmp_path / "pwned"
    torch.save({"model": {"w": torch.ones(2)}, "exploit": _Exploit(marker)}, tmp_path / "released.pt")
    with pytest.raises(ConversionError) as err:
        read_tensors(tmp_path / "released.pt")
    assert re.fullmatch(rf"checkpoint file {re.escape(str(tmp_path))}/released\.pt holds objects other than tensors "
                        r"and plain data; refusing to unpickle it \(UnpicklingError: .*GLOBAL posix\.system.*\)",
                        str(err.value))
    assert not marker.exists()


# --- the save directory: latest, re-saves, the lock -----------------------------------------------------------------

def test_load_latest_needs_a_latest_auto_starts_fresh(tp2_run, tmp_path):
    """train.load=latest without ``latest`` is an error saying how to start fresh; train.load=auto starts fresh only
    where no checkpoint was ever saved."""
    import re

    empty = tmp_path / "empty"
    with pytest.raises(CheckpointError) as err:
        checkpointing.resolve("latest", str(empty))
    assert str(err.value) == (f"train.load=latest but {empty}/latest does not exist; to start fresh drop --load "
                              "(train.load=null), or use train.load=auto to resume when there is a checkpoint and "
                              "start fresh when there is none")
    assert checkpointing.resolve("auto", str(empty)) is None
    ckpt = _copy(tp2_run[0], tmp_path / "ckpt")
    assert checkpointing.resolve("auto", str(ckpt)) == ckpt / "step_00000002"
    (ckpt / "latest").unlink()
    with pytest.raises(CheckpointError, match=rf"^train.load=auto but {re.escape(str(ckpt))} holds checkpoints "
                                              rf"\(newest step_00000002\) and no latest file; resume with "
                                              rf"train.load={re.escape(str(ckpt))}/step_00000002$"):
        checkpointing.resolve("auto", str(ckpt))


@pytest.mark.parametrize("content", ["absolute path", "parent path", "other text", "symlink"])
def test_latest_names_only_a_checkpoint_beside_it(tp2_run, tmp_path, content):
    """``latest`` holding a path (even of a real checkpoint elsewhere), other text, or being a symlink is refused,
    read as latest or through its save directory, and what it holds or points at is never echoed."""
    ckpt = _copy(tp2_run[0], tmp_path / "ckpt")
    _copy(tp2_run[0], tmp_path / "other")
    secret = tmp_path / "secret.txt"
    secret.write_text("s3cret-token\n")
    pointer = ckpt / "latest"
    pointer.unlink()
    planted = {"absolute path": f"{tmp_path}/other/step_00000002", "parent path": "../other/step_00000002",
               "other text": "s3cret-token"}.get(content)
    if planted:
        pointer.write_text(planted + "\n")
        expected = (f"{pointer} does not hold a checkpoint name like step_00000100 (a folder beside it); write the "
                    "newest complete one's name into it")
    else:
        pointer.symlink_to(secret)
        expected = (f"{pointer} is a symlink; it must be a plain file holding the name of a checkpoint folder beside "
                    f"it: replace it, e.g. echo step_00000100 > {pointer}")
    for load, save in (("latest", str(ckpt)), (str(ckpt), None)):
        with pytest.raises(CheckpointError) as err:
            checkpointing.resolve(load, save)
        assert str(err.value) == expected and "s3cret" not in str(err.value) and "other" not in str(err.value)


def test_an_interrupted_resave_still_loads_and_is_tidied(tp2_run, tmp_path):
    """A re-save of step 2 killed between its two renames (the old folder set aside as ``.old-step_00000002``, the
    new one still ``.tmp-``): ``latest`` still resolves to a complete checkpoint, and the next run's lock puts the
    old folder back and drops the unfinished one. Killed after the second rename: the next run drops the old one."""
    ckpt = _copy(tp2_run[0], tmp_path / "ckpt")
    os.replace(ckpt / "step_00000002", ckpt / ".old-step_00000002")
    shutil.copytree(ckpt / ".old-step_00000002", ckpt / ".tmp-step_00000002")
    path = checkpointing.resolve("latest", str(ckpt))
    assert path == ckpt / ".old-step_00000002" and checkpointing.verify(path)["step"] == 2
    checkpointing.lock_save_dir(ckpt).close()
    assert sorted(p.name for p in ckpt.iterdir()) == [".lock", "latest", "step_00000002"]
    shutil.copytree(ckpt / "step_00000002", ckpt / ".old-step_00000002")
    checkpointing.lock_save_dir(ckpt).close()
    assert sorted(p.name for p in ckpt.iterdir()) == [".lock", "latest", "step_00000002"]
    assert checkpointing.resolve("latest", str(ckpt)) == ckpt / "step_00000002"


def test_the_save_dir_lock_names_its_holder_and_dies_with_it(tmp_path):
    """A second claim on a save directory fails naming the holder; a holder killed with SIGKILL leaves no stale
    lock."""
    import multiprocessing as mp
    import re
    import signal
    import socket

    lock = checkpointing.lock_save_dir(tmp_path / "ckpt")
    try:
        with pytest.raises(CheckpointError, match=rf"^{re.escape(str(tmp_path))}/ckpt is in use by another training "
                                                  rf"run \(pid {os.getpid()} on {re.escape(socket.gethostname())} "
                                                  r"since \d{4}-\d\d-\d\d \d\d:\d\d:\d\d\); wait for it to end, or "
                                                  r"set train.save to another directory$"):
            checkpointing.lock_save_dir(tmp_path / "ckpt")
    finally:
        lock.close()

    def hold_then_die():
        checkpointing.lock_save_dir(tmp_path / "ckpt")
        os.kill(os.getpid(), signal.SIGKILL)

    child = mp.get_context("fork").Process(target=hold_then_die)
    child.start()
    child.join(30)
    assert child.exitcode == -signal.SIGKILL
    assert (tmp_path / "ckpt" / ".lock").read_text().startswith(f"pid {child.pid} on ")
    checkpointing.lock_save_dir(tmp_path / "ckpt").close()


def test_another_architecture_is_named_before_the_model_is_built(tp2_run, tmp_path, corpus):  # noqa: F811
    """--load of a checkpoint whose model has other parameter shapes: the config check names the first differing
    key and the run config to take (explicit path, at load_config); train.load=latest does the same check when
    training starts, before the model is built. Keys that change no shape (seq_length, swa_window) pass."""
    from megatron_based.model.config import ConfigError

    from .test_train import tiny_config as config

    ckpt = tp2_run[0] / "step_00000002"
    tp2 = ["parallel.tensor_model_parallel_size=2", "parallel.sequence_parallel=true"]
    for override, saved, ours in (("model.hidden_size=96", 64, 96), ("model.layer_pattern=CLSS", "'CLSC'", "'CLSS'"),
                                  ("model.feature_dim=8", 4, 8), ("model.vocab_size=1024", 512, 1024)):
        key = override.split("=")[0]
        with pytest.raises(ConfigError) as err:
            config(tmp_path / key, corpus, [override, f"train.load={ckpt}"], world_size=2)
        assert str(err.value) == (f"train.load (--load): checkpoint {ckpt} was saved with {key}={saved}, this config "
                                  f"has {ours}: use the model section it was saved with ({ckpt}/run_config.yaml)")
    for override in ("model.seq_length=32", "model.swa_window=8"):
        config(tmp_path / "ok", corpus, [*tp2, override, f"train.load={ckpt}"], world_size=2)
    # what the training loop calls for latest / auto, once resolved
    spec = config(tmp_path / "latest", corpus, ["model.num_attention_heads=8"], world_size=1).model_spec()
    with pytest.raises(CheckpointError, match=r"was saved with model.num_attention_heads=4, this config has 8"):
        checkpointing.check_architecture(checkpointing.resolve("latest", str(tp2_run[0])), spec)


def test_inference_with_a_config_of_another_architecture_names_the_key(tp2_run, tmp_path):
    """load_model (generate / eval / convert) with a config and a training checkpoint of other shapes: the key,
    before the model is built."""
    import yaml

    from megatron_based.inference.loader import load_model

    from .test_train import TINY

    ckpt = tp2_run[0] / "step_00000002"
    path = tmp_path / "other.yaml"
    path.write_text(yaml.safe_dump({"model": {**TINY["model"], "hidden_size": 96}}))
    with pytest.raises(CheckpointError, match=r"was saved with model.hidden_size=64, this config has 96: use the "
                                              r"model section it was saved with"):
        load_model(str(path), str(ckpt))
