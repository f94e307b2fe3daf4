"""Checkpoints with Megatron-Core ``dist_checkpointing``: model, optimizer, scheduler, RNG and data position.

Layout under ``train.save``::

    step_00000100/      a complete checkpoint (dist_checkpointing files + run_config.yaml + manifest.json)
    latest              the name of the newest complete checkpoint, replaced atomically

A checkpoint is written into ``.tmp-step_...``; once every rank has written its shards, rank 0 records each file's
size and CRC32 in ``manifest.json``, renames the folder and then rewrites ``latest``. A crash at any point leaves
either the previous ``latest`` or the new one, never a partial checkpoint. Loading checks every file against the
manifest first (a truncated or corrupted file is named in the error). Nothing is unpickled freely: the common
state is read by ``torch.load(weights_only=True)`` and torch's ``.metadata`` pickle (which torch.distributed.checkpoint
reads with plain ``pickle.load``) is first parsed here with an unpickler that only admits its metadata classes.

Tensors are saved with their global shapes, so a checkpoint loads at another TP / PP / DP layout (resharding).
"""
from __future__ import annotations

import json
import os
import pickle
import shutil
import zlib
from pathlib import Path

import torch
import torch.distributed as dist
import yaml

MANIFEST = "manifest.json"
LATEST = "latest"
RUN_CONFIG = "run_config.yaml"


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be loaded; the message names the file."""


def checkpoint_name(step: int) -> str:
    return f"step_{step:08d}"


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def _crc32(path: Path) -> int:
    crc = 0
    with path.open("rb") as f:
        while chunk := f.read(1 << 22):
            crc = zlib.crc32(chunk, crc)
    return crc


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def rng_state() -> dict:
    """This rank's generators: torch CPU, CUDA (if any) and Megatron's model-parallel tracker."""
    from megatron.core.tensor_parallel import get_cuda_rng_tracker

    state = {"cpu": torch.get_rng_state(), "tracker": get_cuda_rng_tracker().get_states()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict) -> None:
    from megatron.core.tensor_parallel import get_cuda_rng_tracker

    torch.set_rng_state(state["cpu"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
    get_cuda_rng_tracker().set_states(state["tracker"])


def model_sharded_state_dict(model) -> dict:
    """The model's sharded tensors, one key per layer: BASED stacks mix layer types, so Megatron's default of
    stacking same-named tensors across layers does not apply. DDP's ``module.`` prefix is left out, so a checkpoint
    loads into a bare model (inference, conversion) as well."""
    return getattr(model, "module", model).sharded_state_dict(metadata={"non_homogeneous_layers": True})


def _gather_rng() -> list:
    states = [None] * (dist.get_world_size() if dist.is_initialized() else 1)
    if dist.is_initialized():
        dist.all_gather_object(states, rng_state())
    else:
        states[0] = rng_state()
    return states


def save_checkpoint(save_dir: str | os.PathLike, step: int, model, optimizer, scheduler, state: dict,
                    run_config: dict) -> Path:
    """Save atomically as ``save_dir/step_<step>`` and point ``latest`` at it. Collective: call on every rank."""
    from megatron.core import dist_checkpointing

    save_dir = Path(save_dir)
    final = save_dir / checkpoint_name(step)
    tmp = save_dir / f".tmp-{final.name}"
    if _rank() == 0:
        save_dir.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
    _barrier()
    model_sd = model_sharded_state_dict(model)
    sharded = {"model": model_sd, "optimizer": optimizer.sharded_state_dict(model_sd),
               "scheduler": scheduler.state_dict(), "state": dict(state), "rng": _gather_rng()}
    dist_checkpointing.save(sharded, str(tmp))
    _barrier()
    if _rank() == 0:
        (tmp / RUN_CONFIG).write_text(yaml.safe_dump(run_config, sort_keys=False))
        files = {p.name: {"bytes": p.stat().st_size, "crc32": _crc32(p)} for p in sorted(tmp.iterdir())
                 if p.is_file()}
        _write_atomic(tmp / MANIFEST, json.dumps({"step": step, "files": files}, indent=1))
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        _write_atomic(save_dir / LATEST, final.name + "\n")
    _barrier()
    return final


def resolve(load: str, save_dir: str | None) -> Path | None:
    """``load`` as a checkpoint directory: ``"latest"`` reads ``save_dir/latest`` (None if there is none yet)."""
    if load == "latest":
        pointer = Path(save_dir) / LATEST
        if not pointer.is_file():
            return None
        name = pointer.read_text().strip()
        path = Path(save_dir) / name
        if not path.is_dir():
            raise CheckpointError(f"{pointer} names {name}, which does not exist in {save_dir}")
        return path
    path = Path(load)
    if (path / LATEST).is_file():  # a save directory given directly
        return resolve("latest", str(path))
    if not path.is_dir():
        raise CheckpointError(f"checkpoint directory {path} does not exist")
    return path


def verify(path: Path) -> None:
    """Check every file against the manifest; raise :class:`CheckpointError` naming the first bad one."""
    manifest = path / MANIFEST
    if not manifest.is_file():
        raise CheckpointError(f"{manifest} is missing: {path} is not a complete checkpoint (interrupted save?)")
    try:
        files = json.loads(manifest.read_text())["files"]
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise CheckpointError(f"{manifest} is corrupted ({e})") from None
    for name, meta in files.items():
        f = path / name
        if not f.is_file():
            raise CheckpointError(f"checkpoint file {f} is missing")
        size = f.stat().st_size
        if size != meta["bytes"]:
            raise CheckpointError(f"checkpoint file {f} has {size} bytes, {meta['bytes']} were written "
                                  "(truncated or overwritten)")
        if _crc32(f) != meta["crc32"]:
            raise CheckpointError(f"checkpoint file {f} is corrupted (CRC32 differs from {manifest})")
    _check_metadata_pickle(path)


class _MetadataUnpickler(pickle.Unpickler):
    """Admits only what torch.distributed.checkpoint writes into ``.metadata``."""

    MODULES = ("torch.distributed.checkpoint.metadata",)
    NAMES = {("torch.distributed.checkpoint.filesystem", "_StorageInfo"), ("torch", "Size"),
             ("torch.serialization", "_get_layout"), ("collections", "OrderedDict")}

    def find_class(self, module, name):
        if module in self.MODULES or (module, name) in self.NAMES or (
                module == "torch" and isinstance(getattr(torch, name, None), torch.dtype)):
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"{module}.{name} is not allowed")


def _check_metadata_pickle(path: Path) -> None:
    f = path / ".metadata"
    if not f.is_file():
        raise CheckpointError(f"checkpoint file {f} is missing")
    try:
        with f.open("rb") as fh:
            _MetadataUnpickler(fh).load()
    except Exception as e:  # noqa: BLE001 - any failure means we must not hand the file to pickle.load
        raise CheckpointError(f"checkpoint file {f} holds objects other than checkpoint metadata; refusing to "
                              f"unpickle it ({type(e).__name__}: {e})") from None


def _verify_collective(path: Path) -> None:
    """Rank 0 reads the files; every rank raises the same error."""
    error = [None]
    if _rank() == 0:
        try:
            verify(path)
        except CheckpointError as e:
            error[0] = str(e)
    if dist.is_initialized():
        dist.broadcast_object_list(error, src=0)
    if error[0]:
        raise CheckpointError(error[0])


def _load(sharded: dict, path: Path) -> dict:
    from megatron.core import dist_checkpointing

    try:
        return dist_checkpointing.load(sharded, str(path))
    except CheckpointError:
        raise
    except Exception as e:  # dist_checkpointing / torch raise many types; the caller needs the path
        raise CheckpointError(f"checkpoint {path} could not be loaded: {type(e).__name__}: {e}") from e


def load_checkpoint(path: Path, model, optimizer=None, scheduler=None) -> dict:
    """Load into ``model`` (and ``optimizer``, ``scheduler``, this rank's RNG when the world size matches);
    returns the saved training state (step, consumed samples, ...). Collective."""
    _verify_collective(path)
    model_sd = model_sharded_state_dict(model)
    sharded = {"model": model_sd}
    if optimizer is not None:
        sharded["optimizer"] = optimizer.sharded_state_dict(model_sd, is_loading=True)
    loaded = _load(sharded, path)
    getattr(model, "module", model).load_state_dict(loaded["model"])
    if optimizer is not None:
        optimizer.load_state_dict(loaded["optimizer"])
    if scheduler is not None:
        scheduler.load_state_dict(loaded["scheduler"])
    rng = loaded.get("rng")
    world = dist.get_world_size() if dist.is_initialized() else 1
    if optimizer is not None and rng is not None and len(rng) == world:
        set_rng_state(rng[_rank()])
    return dict(loaded.get("state", {}))


def saved_run_config(path: Path) -> dict:
    """The run configuration a checkpoint was trained with (model / parallel / train / data sections)."""
    f = Path(path) / RUN_CONFIG
    if not f.is_file():
        raise CheckpointError(f"{f} is missing: {path} is not a checkpoint written by megatron_based.train")
    try:
        return yaml.safe_load(f.read_text())
    except yaml.YAMLError as e:
        raise CheckpointError(f"checkpoint file {f} is not a plain YAML run config ({e})") from None
