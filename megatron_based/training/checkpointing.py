"""Checkpoints with Megatron-Core ``dist_checkpointing``: model, optimizer, scheduler, RNG and data position.

Layout under ``train.save``::

    step_00000100/      a complete checkpoint (dist_checkpointing files + run_config.yaml + manifest.json)
    latest              the name of the newest complete checkpoint, replaced atomically
    .lock               flock'ed by the run writing here: a second run on the directory refuses to start

A checkpoint is written into ``.tmp-step_...``; once every rank has written its shards, rank 0 records each file's
size and CRC32 in ``manifest.json``, renames the folder and then rewrites ``latest``; re-saving a step first renames
the old folder to ``.old-step_...`` and deletes it only after ``latest`` is rewritten. A crash at any point leaves
either the previous ``latest`` or the new one, never a partial checkpoint. Loading checks every file against the
manifest first (a truncated or corrupted file, or one the manifest does not list, is named in the error). Nothing in
a checkpoint can run code when it is loaded: torch's ``.metadata`` pickle is unpickled only with an allowlist of its
exact metadata classes, and every stored object (Megatron's common state, modules' ``_extra_state``) only with
``torch.load(weights_only=True)``, both in :func:`verify` and while torch and Megatron read the checkpoint
(:func:`_restricted_unpickling`). docs/training.md states the trust model.

Tensors are saved with their global shapes, so a checkpoint loads at another TP / PP / CP / DP layout (resharding).
The optimizer state of Megatron's distributed optimizer is saved in one of two of Megatron's formats
(``train.optimizer_checkpoint_format``, recorded in the manifest so a load always reads what was written):
``fully_reshardable`` (the default) gathers each parameter's Adam state into the parameter's own (global) shape,
so it reshards like the model; ``dp_reshardable`` writes each rank's flat buffer shard as is (no gather: less memory
and time at save) and only loads at the same TP / PP / CP sizes (DP may change). docs/training.md has the costs.
"""
from __future__ import annotations

import contextlib
import fcntl
import io
import json
import os
import pickle
import queue
import re
import shutil
import socket
import time
import types
import zlib
from pathlib import Path

import torch
import torch.distributed as dist
import yaml

MANIFEST = "manifest.json"
LATEST = "latest"
RUN_CONFIG = "run_config.yaml"
OPTIMIZER_FORMATS = ("fully_reshardable", "dp_reshardable")
LOCK = ".lock"
STEP_NAME = re.compile(r"step_\d{8,}")  # what checkpoint_name writes; the only thing ``latest`` may hold


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be loaded; the message names the file."""


def checkpoint_name(step: int) -> str:
    return f"step_{step:08d}"


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def _on_rank0(fn):
    """``fn()`` on rank 0 only; every rank returns its result, or raises its :class:`CheckpointError` (or
    ``OSError``) as a :class:`CheckpointError`, so no rank waits in a collective for one that failed."""
    result = [None, None]
    if _rank() == 0:
        try:
            result[1] = fn()
        except (CheckpointError, OSError) as e:
            result[0] = str(e)
    if dist.is_initialized():
        dist.broadcast_object_list(result, src=0)
    if result[0]:
        raise CheckpointError(result[0])
    return result[1]


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


def _optimizer_metadata(optimizer_format: str) -> dict:
    """``sharded_state_dict`` metadata for Megatron's optimizers (megatron-core's own default format,
    ``fully_sharded_model_space``, no longer saves in 0.19). Without the distributed optimizer the format key is
    ignored and the state is saved per parameter (fully reshardable)."""
    if optimizer_format not in OPTIMIZER_FORMATS:
        raise CheckpointError(f"unknown optimizer checkpoint format {optimizer_format!r}; use one of "
                              f"{', '.join(OPTIMIZER_FORMATS)}")
    return {"distrib_optim_sharding_type": optimizer_format, "chained_optim_avoid_prefix": True}


def torch_optimizers(optimizer) -> list[torch.optim.Optimizer]:
    """The torch optimizers under a Megatron optimizer (chained or not; a bare torch optimizer stands for itself)."""
    found = []
    for opt in getattr(optimizer, "chained_optimizers", None) or [optimizer]:
        inner = getattr(opt, "optimizer", opt)
        if isinstance(inner, torch.optim.Optimizer):
            found.append(inner)
    return found


def _init_adam_state(optimizer) -> None:
    """Give every parameter of the torch Adam(W)s under a Megatron optimizer an empty state (step 0, zero moments),
    as loading needs: without TransformerEngine or apex, Megatron's distributed optimizer reads the common ``step``
    of the existing state when it builds the state dict to load into, and a fresh optimizer has none."""
    for torch_opt in torch_optimizers(optimizer):
        for group in torch_opt.param_groups:
            for p in group["params"]:
                if not torch_opt.state[p]:
                    torch_opt.state[p] = {"step": torch.zeros((), dtype=torch.float32, device=p.device),
                                          "exp_avg": torch.zeros_like(p), "exp_avg_sq": torch.zeros_like(p)}


def _load_only_saved_optimizer_keys() -> None:
    """Megatron-core 0.19's distributed optimizer, without TransformerEngine or apex, keeps torch Adam's ``step`` as a
    tensor in each parameter's state, which its loads mishandle: the fully-reshardable load looks for a saved
    per-parameter ``step`` it never writes (``KeyError: 'step'``), and the dp-reshardable load copies back the
    *current* (pre-load) ``step`` it keeps as a local object, resetting Adam's bias correction. The step is restored
    from the saved parameter groups by ``load_state_dict``; copy only the other state tensors the checkpoint holds.
    Process-wide and idempotent."""
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    setter = DistributedOptimizer._set_main_param_and_optimizer_states
    if getattr(setter, "_saved_keys_only", False):
        return

    def set_saved(self, model_param, tensors):
        group_index, group_order = self.model_param_group_index_map[model_param]
        main_param = self.optimizer.param_groups[group_index]["params"][group_order]
        state = self.optimizer.state[main_param]
        tensors = {k: v for k, v in tensors.items() if k != "step"}
        held = {k: v for k, v in state.items() if torch.is_tensor(v) and k not in tensors}
        for k in held:
            del state[k]
        try:
            setter(self, model_param, tensors)
        finally:
            state.update(held)

    set_saved._saved_keys_only = True
    DistributedOptimizer._set_main_param_and_optimizer_states = set_saved


def _unshare_adam_steps(optimizer) -> None:
    """Megatron's distributed optimizer (without TransformerEngine or apex) loads one ``step`` tensor into the state
    of every parameter; torch's Adam increments each parameter's ``step`` in place, so a shared tensor would advance
    once per parameter per step and skew the bias correction of every later update. Give each its own copy."""
    for torch_opt in torch_optimizers(optimizer):
        for st in torch_opt.state.values():
            if torch.is_tensor(st.get("step")):
                st["step"] = st["step"].detach().clone()


def _layout() -> dict:
    from megatron.core import parallel_state as ps

    return {"tp": ps.get_tensor_model_parallel_world_size(), "pp": ps.get_pipeline_model_parallel_world_size(),
            "cp": ps.get_context_parallel_world_size(), "dp": ps.get_data_parallel_world_size()}


def _write_results_in_process() -> None:
    """Megatron's synchronous save writes in this process's threads but hands their results back through a
    ``multiprocessing.Manager().Queue()``: a server process it starts at the first save. A SIGTERM to the process
    group (torchrun, slurm, ``timeout``) kills that server as well, and the save the SIGTERM asks for then fails
    (BrokenPipeError). A plain queue serves a synchronous save. Process-wide and idempotent; we never save
    asynchronously (an async writer process could not reach this queue)."""
    from megatron.core.dist_checkpointing.strategies import filesystem_async

    if not isinstance(filesystem_async._results_queue, queue.Queue):
        filesystem_async._results_queue = queue.Queue()


def save_checkpoint(save_dir: str | os.PathLike, step: int, model, optimizer, scheduler, state: dict,
                    run_config: dict, optimizer_format: str = "fully_reshardable") -> Path:
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
    metadata = _optimizer_metadata(optimizer_format)
    sharded = {"model": model_sd, "optimizer": optimizer.sharded_state_dict(model_sd, metadata=metadata),
               "scheduler": scheduler.state_dict(), "state": dict(state), "rng": _gather_rng()}
    _write_results_in_process()
    dist_checkpointing.save(sharded, str(tmp))
    _barrier()
    if _rank() == 0:
        (tmp / RUN_CONFIG).write_text(yaml.safe_dump(run_config, sort_keys=False))
        files = {p.name: {"bytes": p.stat().st_size, "crc32": _crc32(p)} for p in sorted(tmp.iterdir())
                 if p.is_file()}
        manifest = {"step": step, "optimizer_format": optimizer_format, "layout": _layout(), "files": files}
        _write_atomic(tmp / MANIFEST, json.dumps(manifest, indent=1))
        old = save_dir / f".old-{final.name}"
        if final.exists():  # a directory cannot be renamed over another: set the old one aside, delete it last
            shutil.rmtree(old, ignore_errors=True)
            os.replace(final, old)
        os.replace(tmp, final)
        _write_atomic(save_dir / LATEST, final.name + "\n")
        shutil.rmtree(old, ignore_errors=True)
    _barrier()
    return final


def lock_save_dir(save_dir: str | os.PathLike):
    """Claim ``save_dir`` for this run: an exclusive ``flock`` on ``save_dir/.lock`` that rank 0 holds until the
    returned file is closed or its process ends (the kernel drops it on any death, SIGKILL included, so no lock is
    ever stale). A second run fails here, naming the holder recorded in the file. Then tidies what an interrupted
    save left (:func:`_tidy`), which is safe only under the lock. Collective; returns the lock file on rank 0, None
    elsewhere. Across hosts flock needs a file system that honours it (NFSv4; Lustre mounted with ``-o flock``)."""
    held = []

    def claim():
        save = Path(save_dir)
        save.mkdir(parents=True, exist_ok=True)
        f = open(save / LOCK, "a+")
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = ""
            for _ in range(20):  # the holder writes its line right after it takes the lock
                f.seek(0)
                holder = f.read().strip()
                if holder:
                    break
                time.sleep(0.05)
            f.close()
            raise CheckpointError(f"{save} is in use by another training run ({holder or 'holder not recorded'}); "
                                  "wait for it to end, or set train.save to another directory") from None
        except OSError as e:
            f.close()
            raise CheckpointError(f"cannot lock {save / LOCK} ({e.strerror}): train.save must be on a file system "
                                  "with flock (on Lustre, mount with -o flock)") from None
        f.seek(0)
        f.truncate()
        f.write(f"pid {os.getpid()} on {socket.gethostname()} since {time.strftime('%Y-%m-%d %H:%M:%S')}\n")
        f.flush()
        held.append(f)
        _tidy(save)

    _on_rank0(claim)
    return held[0] if held else None


def _tidy(save_dir: Path) -> None:
    """What interrupted saves left: ``.tmp-`` folders (unfinished) are deleted; an ``.old-step_X`` folder (the
    checkpoint a re-save of step X was replacing) is deleted if the new step_X is in place, else renamed back."""
    for tmp in save_dir.glob(".tmp-step_*"):
        shutil.rmtree(tmp, ignore_errors=True)
    for old in save_dir.glob(".old-step_*"):
        final = save_dir / old.name.removeprefix(".old-")
        if final.exists():
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(old, final)


def resolve(load: str, save_dir: str | None) -> Path | None:
    """``load`` (``train.load``) as a checkpoint directory: ``"latest"``, the one ``save_dir/latest`` names (an error
    if there is none); ``"auto"``, the same, or None (start fresh) while ``save_dir`` holds no checkpoint; else a
    checkpoint directory, or a save directory (its ``latest``)."""
    if load in ("latest", "auto"):
        save_dir = Path(save_dir)
        pointer = save_dir / LATEST
        name = _read_latest(pointer)
        if name is None:
            saved = sorted(p.name for p in save_dir.glob("step_*") if STEP_NAME.fullmatch(p.name) and p.is_dir())
            if load == "latest":
                raise CheckpointError(f"train.load=latest but {pointer} does not exist; to start fresh drop --load "
                                      "(train.load=null), or use train.load=auto to resume when there is a "
                                      "checkpoint and start fresh when there is none")
            if saved:
                raise CheckpointError(f"train.load=auto but {save_dir} holds checkpoints (newest {saved[-1]}) and no "
                                      f"{LATEST} file; resume with train.load={save_dir / saved[-1]}")
            return None
        # .old-: a re-save of that step was interrupted between its two renames (save_checkpoint)
        for path in (save_dir / name, save_dir / f".old-{name}"):
            if path.is_dir():
                return path
        raise CheckpointError(f"{pointer} names {name}, which does not exist in {save_dir}")
    path = Path(load)
    if (path / LATEST).exists() or (path / LATEST).is_symlink():  # a save directory given directly
        return resolve("latest", str(path))
    if not path.is_dir():
        raise CheckpointError(f"checkpoint directory {path} does not exist")
    return path


def _read_latest(pointer: Path) -> str | None:
    """The checkpoint name in ``latest`` (None if it does not exist). Only a plain file holding a bare
    ``step_XXXXXXXX`` is accepted, so the checkpoint it names is always inside the save directory, and what else it
    holds is never echoed."""
    if pointer.is_symlink():
        raise CheckpointError(f"{pointer} is a symlink; it must be a plain file holding the name of a checkpoint "
                              f"folder beside it: replace it, e.g. echo step_00000100 > {pointer}")
    if not pointer.exists():
        return None
    try:
        with pointer.open("rb") as f:
            name = f.read(64).decode("ascii").strip()
    except (OSError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{pointer} cannot be read ({getattr(e, 'strerror', None) or e}); it must be a plain "
                              "file holding the name of a checkpoint folder beside it, e.g. step_00000100") from None
    if not STEP_NAME.fullmatch(name):
        raise CheckpointError(f"{pointer} does not hold a checkpoint name like step_00000100 (a folder beside it); "
                              "write the newest complete one's name into it")
    return name


def check_sizes(path: Path) -> dict:
    """The cheap part of :func:`verify` (no file is read but the manifest): the manifest is there, and every file it
    lists with its recorded size. ``train.load``'s check before any process group starts. Returns the manifest."""
    manifest = path / MANIFEST
    if not manifest.is_file():
        raise CheckpointError(f"{manifest} is missing: {path} is not a complete checkpoint (interrupted save?)")
    try:
        content = json.loads(manifest.read_text())
        files = content["files"]
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise CheckpointError(f"{manifest} is corrupted ({e})") from None
    for name in files:
        if Path(name).name != name:
            raise CheckpointError(f"{manifest} lists {name!r}, which is not a file name inside {path}")
    for name, meta in files.items():
        f = path / name
        if not f.is_file():
            raise CheckpointError(f"checkpoint file {f} is missing")
        size = f.stat().st_size
        if size != meta["bytes"]:
            raise CheckpointError(f"checkpoint file {f} has {size} bytes, {meta['bytes']} were written "
                                  "(truncated or overwritten)")
    return content


def verify(path: Path) -> dict:
    """Check a checkpoint before anything in it is unpickled; raise :class:`CheckpointError` naming the first bad
    file. The directory holds exactly the files the manifest lists, each with its recorded size and CRC32;
    ``.metadata`` holds only torch's metadata classes and points only into listed files; every stored object is plain
    data. Returns the manifest."""
    content = check_sizes(path)
    manifest, files = path / MANIFEST, content["files"]
    # Megatron reads some files only if they exist (a legacy common.pt replaces the saved common state): a file
    # the manifest does not list would be read unchecked.
    unlisted = sorted(p.name for p in path.iterdir() if p.name != MANIFEST and p.name not in files)
    if unlisted:
        raise CheckpointError(f"checkpoint file {path / unlisted[0]} is not listed in {manifest}; a checkpoint "
                              "holds only the files it was saved with: remove it, or load another checkpoint")
    for name, meta in files.items():
        f = path / name
        if _crc32(f) != meta["crc32"]:
            raise CheckpointError(f"checkpoint file {f} is corrupted (CRC32 differs from {manifest})")
    _check_stored_objects(path, _read_metadata(path), files)
    return content


def error_line(e: BaseException) -> str:
    """``e`` in one line; of torch's weights-only refusal only the part that names what was refused."""
    lines = [line.strip() for line in str(e).splitlines() if line.strip()]
    if len(lines) > 2 and lines[0].startswith("Weights only load failed"):
        lines = lines[1:-1]
    return f"{type(e).__name__}: {' '.join(lines)}"


# Exactly what torch.distributed.checkpoint writes into ``.metadata`` (listed from our checkpoints with pickletools):
# its metadata dataclasses, the filesystem writer's storage record, torch.Size, dtypes and the layout lookup.
_METADATA_CLASSES = frozenset(
    [("torch.distributed.checkpoint.metadata", name) for name in (
        "Metadata", "MetadataIndex", "StorageMeta", "TensorStorageMetadata", "BytesStorageMetadata",
        "ChunkStorageMetadata", "TensorProperties", "_MEM_FORMAT_ENCODING")]
    + [("torch.distributed.checkpoint.filesystem", "_StorageInfo"), ("torch", "Size"),
       ("torch.serialization", "_get_layout")]
    + [("torch", name) for name, value in vars(torch).items() if isinstance(value, torch.dtype)])


class _MetadataUnpickler(pickle.Unpickler):
    """Admits only the classes of ``_METADATA_CLASSES``, each by its exact module and name. Never by module: a
    protocol-4 pickle names ``os.system`` as ``torch.distributed.checkpoint.metadata`` + ``os.system``
    (``STACK_GLOBAL`` resolves dotted names attribute by attribute)."""

    def find_class(self, module, name):
        if (module, name) in _METADATA_CLASSES:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"{module}.{name} is not checkpoint metadata")


def _load_metadata_pickle(file) -> object:
    return _MetadataUnpickler(file).load()


def _read_metadata(path: Path):
    from torch.distributed.checkpoint.metadata import Metadata

    f = path / ".metadata"
    if not f.is_file():
        raise CheckpointError(f"checkpoint file {f} is missing")
    try:
        with f.open("rb") as fh:
            metadata = _load_metadata_pickle(fh)
    except Exception as e:  # noqa: BLE001 - any failure means we must not hand the file to pickle.load
        raise CheckpointError(f"checkpoint file {f} holds objects other than checkpoint metadata; refusing to "
                              f"unpickle it ({error_line(e)})") from None
    if not isinstance(metadata, Metadata):
        raise CheckpointError(f"checkpoint file {f} holds a {type(metadata).__name__}, not checkpoint metadata")
    return metadata


def _check_stored_objects(path: Path, metadata, files: dict) -> None:
    """Every item ``.metadata`` points at lies in a listed file, and every stored object (Megatron's common state,
    modules' ``_extra_state``; torch's reader unpickles them with ``weights_only=False``) is plain data: tensors,
    numbers, strings and containers, as ``torch.load(weights_only=True)`` reads them."""
    from torch.distributed.checkpoint.metadata import BytesStorageMetadata

    try:
        items = [(index.fqn, info.relative_path, info.offset, info.length, info.transform_descriptors,
                  isinstance(metadata.state_dict_metadata.get(index.fqn), BytesStorageMetadata))
                 for index, info in metadata.storage_data.items()]
        for key, name, *_ in items:
            if not isinstance(name, str) or name not in files:
                raise CheckpointError(f"checkpoint file {path / '.metadata'} places {key} in {name!r}, which "
                                      f"{MANIFEST} does not list")
    except (AttributeError, TypeError) as e:
        raise CheckpointError(f"checkpoint file {path / '.metadata'} is not valid checkpoint metadata "
                              f"({error_line(e)})") from None
    for key, name, offset, length, transforms, is_object in items:
        if not is_object:
            continue
        f = path / name
        if transforms:  # our saves never transform; torch would decode with the extensions it finds
            raise CheckpointError(f"checkpoint file {f} stores {key} transformed ({transforms}); only untransformed "
                                  "objects are read")
        try:
            with f.open("rb") as fh:
                fh.seek(offset)
                torch.load(io.BytesIO(fh.read(length)), map_location="cpu", weights_only=True)
        except Exception as e:  # noqa: BLE001 - anything torch's restricted unpickler refuses
            raise CheckpointError(f"checkpoint file {f} stores {key} as objects other than plain data; refusing "
                                  f"to unpickle it ({error_line(e)})") from None


@contextlib.contextmanager
def _restricted_unpickling():
    """While torch and Megatron read a checkpoint, every unpickling they do goes through an allowlist:
    ``torch.load`` (torch's checkpoint reader unpickles stored objects with ``weights_only=False``, Megatron reads a
    legacy ``common.pt``) runs with ``weights_only=True``, and the ``pickle.load`` of torch's filesystem reader
    (``.metadata``) is :class:`_MetadataUnpickler`. :func:`verify` has checked the same bytes; this holds even for a
    file changed since. Process-wide while it lasts. Yields the refusals, one line each: torch's reader swallows a
    failed read of ``.metadata`` and then only reports that it has no metadata."""
    from torch.distributed.checkpoint import filesystem

    torch_load, fs_pickle = torch.load, filesystem.pickle
    refusals = []

    def refusing(load):
        def restricted(f, *args, **kwargs):
            try:
                return load(f, *args, **kwargs)
            except pickle.UnpicklingError as e:
                name = f if isinstance(f, (str, os.PathLike)) else getattr(f, "name", None)
                refusals.append(f"{'a stored object' if name is None else Path(name).name} holds objects other than "
                                f"plain data, refused ({error_line(e)})")
                raise
        return restricted

    torch.load = refusing(lambda f, *args, **kwargs: torch_load(f, *args, **{**kwargs, "weights_only": True}))
    filesystem.pickle = types.SimpleNamespace(**{**vars(pickle), "load": refusing(_load_metadata_pickle)})
    try:
        yield refusals
    finally:
        torch.load, filesystem.pickle = torch_load, fs_pickle


def _verify_collective(path: Path) -> dict:
    """Rank 0 reads the files; every rank raises the same error or gets the same manifest."""
    return _on_rank0(lambda: verify(path))


def _check_optimizer_layout(path: Path, manifest: dict) -> str:
    """The optimizer format the checkpoint was written in; ``dp_reshardable`` state only loads at its TP/PP/CP."""
    fmt = manifest.get("optimizer_format", "fully_reshardable")
    saved, now = manifest.get("layout"), _layout()
    if fmt == "dp_reshardable" and saved and any(saved[k] != now[k] for k in ("tp", "pp", "cp")):
        raise CheckpointError(
            f"{path} holds dp_reshardable optimizer state written at TP={saved['tp']} PP={saved['pp']} "
            f"CP={saved['cp']}; it loads only at that TP/PP/CP (now TP={now['tp']} PP={now['pp']} CP={now['cp']}). "
            "Resume at the saved layout, or save with train.optimizer_checkpoint_format=fully_reshardable to reshard")
    return fmt


def _load(sharded: dict, path: Path) -> dict:
    from megatron.core import dist_checkpointing
    from torch.distributed.checkpoint.api import CheckpointException

    try:
        with _restricted_unpickling() as refusals:
            return dist_checkpointing.load(sharded, str(path))
    except CheckpointError:
        raise
    except (Exception, CheckpointException) as e:  # many types; the caller needs the path, in one line
        # torch's reader wraps each rank's error in a CheckpointException (a BaseException) with its traceback
        cause = next(iter(e.failures.values()))[0] if isinstance(e, CheckpointException) else e
        reason = refusals[0] if refusals else error_line(cause)
        raise CheckpointError(f"checkpoint {path} could not be loaded: {reason}") from e


def load_checkpoint(path: Path, model, optimizer=None, scheduler=None) -> dict:
    """Load into ``model`` (and ``optimizer``, ``scheduler``, this rank's RNG when the world size matches);
    returns the saved training state (step, consumed samples, ...). Collective."""
    manifest = _verify_collective(path)
    model_sd = model_sharded_state_dict(model)
    sharded = {"model": model_sd}
    if optimizer is not None:
        metadata = _optimizer_metadata(_check_optimizer_layout(path, manifest))
        _init_adam_state(optimizer)
        _load_only_saved_optimizer_keys()
        sharded["optimizer"] = optimizer.sharded_state_dict(model_sd, is_loading=True, metadata=metadata)
    loaded = _load(sharded, path)
    getattr(model, "module", model).load_state_dict(loaded["model"])
    if optimizer is not None:
        with torch.no_grad():  # fp32 main params are views of the model's leaf parameters
            optimizer.load_state_dict(loaded["optimizer"])
        _unshare_adam_steps(optimizer)
    if scheduler is not None:
        scheduler.load_state_dict(loaded["scheduler"])
    rng = loaded.get("rng")
    world = dist.get_world_size() if dist.is_initialized() else 1
    if optimizer is not None and rng is not None and len(rng) == world:
        set_rng_state(rng[_rank()])
    return dict(loaded.get("state", {}))


# The model keys that fix parameter shapes (a checkpoint of another value cannot load), as BasedConfig resolves them;
# seq_length, swa_window, rope_base and the other keys may change between a save and a resume.
SHAPE_KEYS = ("layer_pattern", "hidden_size", "num_attention_heads", "ffn_hidden_size", "feature_dim",
              "linear_attention_heads", "num_query_groups", "kv_channels", "conv_kernel_size", "long_conv_length",
              "gated_linear_unit", "add_bias_linear")


def check_architecture(path: Path, spec) -> None:
    """A :class:`CheckpointError` naming the first model key whose value differs between the checkpoint's run
    config and ``spec`` (a ``ModelSpec``) in a way that changes parameter shapes, and the file to take the model
    section from. Reads one small YAML file: the check before the model is built (a mismatch otherwise surfaces
    as a shape error inside the checkpoint load, after the process groups, the model and the optimizer)."""
    from ..model.config import ConfigError, model_spec_from_dict, uses_long_filter

    f = Path(path) / RUN_CONFIG
    section = (saved_run_config(path) or {}).get("model")
    try:
        saved = model_spec_from_dict(section or {})
    except ConfigError as e:
        raise CheckpointError(f"{f}: its model section does not build ({e})") from None
    pairs = [(key, getattr(saved, key), getattr(spec, key)) for key in ("vocab_size", "make_vocab_size_divisible_by")]
    pairs += [(key, getattr(saved.config, key), getattr(spec.config, key)) for key in SHAPE_KEYS
              if key != "long_conv_length" or uses_long_filter(spec.config.layer_pattern)]
    for key, theirs, ours in pairs:
        if key == "long_conv_length":  # 0: the sequence length (build_model)
            theirs, ours = theirs or saved.seq_length, ours or spec.seq_length
        if theirs != ours:
            raise CheckpointError(f"checkpoint {path} was saved with model.{key}={theirs!r}, this config has "
                                  f"{ours!r}: use the model section it was saved with ({f})")


def saved_run_config(path: Path) -> dict:
    """The run configuration a checkpoint was trained with (model / parallel / train / data sections)."""
    f = Path(path) / RUN_CONFIG
    if not f.is_file():
        raise CheckpointError(f"{f} is missing: {path} is not a checkpoint written by megatron_based.training")
    try:
        return yaml.safe_load(f.read_text())
    except yaml.YAMLError as e:
        raise CheckpointError(f"checkpoint file {f} is not a plain YAML run config ({e})") from None
