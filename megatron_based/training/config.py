"""The run configuration: one YAML file with ``model:``, ``parallel:``, ``train:`` and ``data:`` sections, plus
``section.key=value`` overrides from the command line. Everything is checked here, before any process group
starts, so a bad value fails in a second with a message naming the key (docs/training.md lists every key).
"""
from __future__ import annotations

import dataclasses
import importlib.util
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch
import yaml

from ..model.config import (CUDA_GRAPH_IMPLS, CUDA_GRAPH_IMPLS_WHY, ConfigError, ModelSpec, check_scalar, gpu_target,
                            model_spec_from_dict, read_yaml_file)
from .checkpointing import CheckpointError, check_architecture, check_sizes, resolve
from .data import DataError, check_split_sizes, load_tokenizer


@dataclass
class ParallelConfig:
    tensor_model_parallel_size: int = 1
    pipeline_model_parallel_size: int = 1
    context_parallel_size: int = 1
    sequence_parallel: bool = False
    use_distributed_optimizer: bool = True  # Megatron's ZeRO-1 optimizer (sharded Adam state over DP x CP)


@dataclass
class TrainConfig:
    micro_batch_size: int = 4
    global_batch_size: int = 16
    train_steps: int = 300
    lr: float = 8e-4
    min_lr: float = 8e-5
    lr_warmup_init: float = 1e-6
    lr_warmup_steps: int = 200
    lr_decay_style: str = "cosine"
    lr_decay_steps: int | None = None  # None: train_steps
    weight_decay: float = 0.1
    adam_beta1: float = 0.9
    adam_beta2: float = 0.95
    adam_eps: float = 1e-8
    clip_grad: float = 1.0
    precision: str = "auto"  # auto: bf16 on GPU, fp32 on CPU
    recompute_granularity: str | None = None  # None, "full" or "selective"
    recompute_method: str = "uniform"
    recompute_num_layers: int = 1
    seed: int = 1234
    save: str | None = None
    save_interval: int = 0  # 0: only at the end (and on SIGTERM)
    optimizer_checkpoint_format: str = "fully_reshardable"  # or dp_reshardable (checkpointing.py, docs/training.md)
    load: str | None = None  # a checkpoint directory, "latest" (the one `save`/latest names) or "auto" (that, or fresh)
    log_interval: int = 1
    eval_interval: int = 100  # 0: no validation
    eval_iters: int = 4
    tensorboard_dir: str | None = None
    metrics_file: str | None = None  # JSON lines per logged step and validation (full-precision scalars)
    max_nonfinite_steps: int = 5
    peak_tflops: float | None = None  # per device, for MFU; None: known GPUs only
    progress: bool = True
    engine: str = "megatron"  # or "deepspeed": DeepSpeed ZeRO instead of Megatron DDP (docs/launching.md)
    zero_stage: int = 1  # DeepSpeed ZeRO stage (1 or 2) when engine is deepspeed


@dataclass
class DataConfig:
    path: list[str] = field(default_factory=list)  # indexed-dataset prefixes (``prefix.bin`` + ``prefix.idx``)
    weights: list[float] | None = None
    tokenizer_model: str | None = None  # sentencepiece .model written by megatron-based-preprocess
    split: str = "98,2,0"
    cache_dir: str | None = None  # default: <save>/data_cache, else beside the first data prefix


# The mixers whose Megatron CUDA-graphed training steps are checked against eager ones on GPUs
# (tests/megatron_based/test_model_gpu.py, test_megatron_cuda_graphs_equal_eager; the entry-point tests): the ones
# ``model.cuda_graph_impl: auto`` graphs. Others (H, Z, E, registered mixers) run eagerly unless set to local.
GRAPH_SAFE_MIXERS = "CLSA"

SECTIONS = {"parallel": ParallelConfig, "train": TrainConfig, "data": DataConfig}
CHOICES = {
    ("train", "precision"): ("auto", "bf16", "fp32"),
    ("train", "recompute_granularity"): (None, "full", "selective"),
    ("train", "recompute_method"): ("uniform", "block"),
    ("train", "lr_decay_style"): ("cosine", "linear", "constant", "inverse-square-root"),
    ("train", "engine"): ("megatron", "deepspeed"),
    ("train", "optimizer_checkpoint_format"): ("fully_reshardable", "dp_reshardable"),
}


@dataclass
class RunConfig:
    model: dict
    parallel: ParallelConfig
    train: TrainConfig
    data: DataConfig
    world_size: int = 1

    @property
    def data_parallel_size(self) -> int:
        p = self.parallel
        return self.world_size // (p.tensor_model_parallel_size * p.pipeline_model_parallel_size
                                   * p.context_parallel_size)

    @property
    def num_microbatches(self) -> int:
        return self.train.global_batch_size // (self.train.micro_batch_size * self.data_parallel_size)

    def cuda_graphs(self) -> tuple[str, str]:
        """The run's ``cuda_graph_impl`` ("local" or "none") and why (the setting, and what turned auto off).
        ``model.cuda_graph_impl: auto`` (the default in run configs) is "local" (Megatron-Core's per-layer CUDA
        graphs) where CUDA-graphed steps are verified to equal eager ones on GPUs: a GPU target, the Megatron engine,
        no activation recompute, no tensor, pipeline or context parallelism (data parallelism only) and only the
        mixers in ``GRAPH_SAFE_MIXERS``; "none" elsewhere, with the first reason. "none" and "local" are taken as
        given (BasedConfig checks "local")."""
        value = self.model.get("cuda_graph_impl", "auto")
        allowed = ("auto", *CUDA_GRAPH_IMPLS)
        if value not in allowed:
            raise ConfigError(f"model.cuda_graph_impl must be {', '.join(allowed[:-1])} or {allowed[-1]} "
                              f"({CUDA_GRAPH_IMPLS_WHY}); got {value!r}")
        if value != "auto":
            return value, f"model.cuda_graph_impl: {value}"
        p, t = self.parallel, self.train
        pattern = str(self.model.get("layer_pattern", ""))
        others = sorted(set(pattern) - set(GRAPH_SAFE_MIXERS))
        for off, why in ((not gpu_target(), "no GPU"),
                         (t.engine != "megatron", f"train.engine {t.engine}"),
                         (t.recompute_granularity is not None,
                          f"train.recompute_granularity {t.recompute_granularity}"),
                         (p.tensor_model_parallel_size > 1, "tensor parallelism"),
                         (p.pipeline_model_parallel_size > 1, "pipeline parallelism"),
                         (p.context_parallel_size > 1, "context parallelism"),
                         (bool(others), f"layer_pattern has {''.join(others)} layers")):
            if off:
                return "none", f"model.cuda_graph_impl: auto, {why}"
        return "local", "model.cuda_graph_impl: auto"

    def cuda_graphs_status(self) -> str:
        """``on (<why>)`` or ``off (<why>)``: what the training log and the dry-run plan say (:meth:`cuda_graphs`)."""
        impl, why = self.cuda_graphs()
        return f"{'on' if impl == 'local' else 'off'} ({why})"

    def model_spec(self) -> ModelSpec:
        """The model section as a validated :class:`ModelSpec`, with the parallel, precision and CUDA-graph
        settings."""
        p, t = self.parallel, self.train
        bf16 = t.precision == "bf16" or (t.precision == "auto" and gpu_target())
        recompute = {}
        if t.recompute_granularity == "full":
            recompute = dict(recompute_granularity="full", recompute_method=t.recompute_method,
                             recompute_num_layers=t.recompute_num_layers)
        elif t.recompute_granularity == "selective":
            recompute = dict(recompute_granularity="selective", recompute_modules=["mlp"])
        return model_spec_from_dict(
            {**self.model, "cuda_graph_impl": self.cuda_graphs()[0]},
            tensor_model_parallel_size=p.tensor_model_parallel_size,
            pipeline_model_parallel_size=p.pipeline_model_parallel_size,
            context_parallel_size=p.context_parallel_size, sequence_parallel=p.sequence_parallel,
            # pipeline_dtype: the activations' dtype between stages; BasedConfig raises it to fp32 when the residual
            # stream is fp32 (model.fp32_residual_connection, on by default in bf16)
            bf16=bf16, params_dtype=torch.bfloat16 if bf16 else torch.float32, pipeline_dtype=torch.bfloat16
            if bf16 else torch.float32, use_cpu_initialization=not torch.cuda.is_available(),
            calculate_per_token_loss=True, **recompute)

    def to_dict(self) -> dict:
        return {"model": dict(self.model), **{s: dataclasses.asdict(getattr(self, s)) for s in SECTIONS}}


def _coerce(section: str, key: str, value, annotation: str):
    """YAML already typed the value; check it against the field's annotation (ints may stand for floats)."""
    where = f"{section}.{key}"
    if value is None:
        if "None" not in annotation:
            raise ConfigError(f"{where} cannot be null")
        return None
    if annotation.startswith("list"):
        value = value if isinstance(value, list) else [value]
        inner = float if "float" in annotation else str
        try:
            return [inner(v) for v in value]
        except (TypeError, ValueError):
            raise ConfigError(f"{where} must be a list of {inner.__name__}, got {value!r}") from None
    for name, typ in (("bool", bool), ("int", int), ("float", float), ("str", str)):
        if annotation.startswith(name):
            return check_scalar(where, value, [typ], str_from_number=True)
    return value


def parse_overrides(overrides: list[str]) -> dict:
    """``["train.lr=1e-3", "model.hidden_size=64"]`` -> ``{"train": {"lr": 0.001}, "model": {...}}``."""
    nested: dict = {}
    for item in overrides:
        key, sep, raw = item.partition("=")
        section, dot, name = key.partition(".")
        if not sep or not dot or not name:
            raise ConfigError(f"override {item!r} must look like section.key=value, e.g. train.lr=1e-3")
        try:
            nested.setdefault(section, {})[name] = yaml.safe_load(raw) if raw else None
        except yaml.YAMLError as e:
            raise ConfigError(f"override {item!r}: its value is not valid YAML ({' '.join(str(e).split())})") from None
    return nested


def load_config(path: str | os.PathLike | None, overrides: list[str] = (), world_size: int | None = None) -> RunConfig:
    """Read the YAML file, apply the overrides, and validate everything (no process group needed)."""
    raw = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file {path} does not exist")
        raw = read_yaml_file(path) or {}
        if not isinstance(raw, dict):
            raise ConfigError(f"{path} must be a mapping with model/parallel/train/data sections")
    for section, values in parse_overrides(list(overrides)).items():
        raw.setdefault(section, {}).update(values)
    unknown = sorted(set(raw) - {"model", *SECTIONS})
    if unknown:
        raise ConfigError(f"unknown config section(s) {unknown}: use model, parallel, train, data")
    sections = {}
    for name, cls in SECTIONS.items():
        values = dict(raw.get(name) or {})
        fields = {f.name: f for f in dataclasses.fields(cls)}
        bad = sorted(set(values) - set(fields))
        if bad:
            raise ConfigError(f"unknown key(s) {[f'{name}.{k}' for k in bad]}; known {name} keys: {sorted(fields)}")
        for key, value in values.items():
            values[key] = _coerce(name, key, value, str(fields[key].type))
            allowed = CHOICES.get((name, key))
            if allowed and values[key] not in allowed:
                raise ConfigError(f"{name}.{key} is {values[key]!r}; use one of {list(allowed)}")
        sections[name] = cls(**values)
    if world_size is None:
        world_size = int(os.environ.get("WORLD_SIZE", 1))
    cfg = RunConfig(model=dict(raw.get("model") or {}), world_size=world_size, **sections)
    validate(cfg)
    return cfg


def validate(cfg: RunConfig) -> None:
    p, t, d = cfg.parallel, cfg.train, cfg.data
    for key in ("tensor_model_parallel_size", "pipeline_model_parallel_size", "context_parallel_size"):
        if getattr(p, key) < 1:
            raise ConfigError(f"parallel.{key} ({getattr(p, key)}) must be >= 1")
    model_parallel = p.tensor_model_parallel_size * p.pipeline_model_parallel_size * p.context_parallel_size
    if cfg.world_size % model_parallel:
        raise ConfigError(
            f"world size ({cfg.world_size} processes) must be divisible by parallel.tensor_model_parallel_size x "
            f"pipeline_model_parallel_size x context_parallel_size = {model_parallel}")
    if p.sequence_parallel and p.tensor_model_parallel_size == 1:
        raise ConfigError("parallel.sequence_parallel=true needs parallel.tensor_model_parallel_size > 1 (it splits "
                          "the sequence over the TP ranks): set sequence_parallel=false or raise the TP size")
    if p.context_parallel_size > 1 and importlib.util.find_spec("megatron_based.model.context_parallel") is None:
        raise ConfigError(f"parallel.context_parallel_size={p.context_parallel_size} needs "
                          "megatron_based.model.context_parallel, which this install does not have yet; set it to 1")
    for key in ("micro_batch_size", "global_batch_size", "train_steps", "log_interval", "eval_iters",
                "max_nonfinite_steps"):
        if getattr(t, key) < 1:
            raise ConfigError(f"train.{key} ({getattr(t, key)}) must be >= 1")
    # A non-finite or out-of-range value would make every update non-finite (or Megatron assert mid-run).
    for key, ok, rule in (("lr", t.lr > 0, "> 0"), ("min_lr", 0 <= t.min_lr <= t.lr, f"in [0, train.lr = {t.lr}]"),
                          ("lr_warmup_init", t.lr_warmup_init >= 0, ">= 0"),
                          ("weight_decay", t.weight_decay >= 0, ">= 0"),
                          ("adam_beta1", 0 <= t.adam_beta1 < 1, "in [0, 1)"),
                          ("adam_beta2", 0 <= t.adam_beta2 < 1, "in [0, 1)"), ("adam_eps", t.adam_eps > 0, "> 0"),
                          ("clip_grad", t.clip_grad >= 0, ">= 0 (0: no clipping)")):
        value = getattr(t, key)
        if not (math.isfinite(value) and ok):
            raise ConfigError(f"train.{key} ({value}) must be a finite number {rule}")
    dp = cfg.data_parallel_size
    if t.global_batch_size % (t.micro_batch_size * dp):
        raise ConfigError(
            f"train.global_batch_size ({t.global_batch_size}) must be divisible by train.micro_batch_size "
            f"({t.micro_batch_size}) x data-parallel size ({dp})")
    decay = t.lr_decay_steps or t.train_steps
    if t.lr_decay_style != "constant" and not 0 <= t.lr_warmup_steps < decay:
        raise ConfigError(f"train.lr_warmup_steps ({t.lr_warmup_steps}) must be smaller than train.lr_decay_steps "
                          f"(default train.train_steps) = {decay}")
    for key, value in (("train.save", t.save), ("train.tensorboard_dir", t.tensorboard_dir),
                       ("data.cache_dir", d.cache_dir)):  # folders the run creates and writes into
        if value and Path(value).exists() and not Path(value).is_dir():
            raise ConfigError(f"{key}: {value} is a file; give a directory (created if missing)")
    if t.save_interval and not t.save:
        raise ConfigError("train.save_interval is set but train.save (the checkpoint directory) is not")
    if t.load in ("latest", "auto") and not t.save:
        raise ConfigError(f"train.load={t.load} resumes from train.save, which is not set")
    load_path = None  # an explicit train.load; latest / auto are resolved when training starts (a save may land)
    if t.load not in (None, "latest", "auto"):
        try:
            load_path = resolve(t.load, t.save)
            if t.engine == "megatron":  # (DeepSpeed writes its own layout)
                check_sizes(load_path)  # an empty, partial or truncated checkpoint, before anything starts
        except CheckpointError as e:
            raise ConfigError(f"train.load (--load): {e}; give a checkpoint directory, a save directory, latest or "
                              "auto") from None
    if t.precision == "bf16":
        if not gpu_target():
            raise ConfigError("train.precision=bf16 needs a GPU here; use auto or fp32 on CPU (planning a GPU job "
                              "from a machine without GPUs: --gpu on the dry run)")
    if not d.path:
        raise ConfigError("data.path is missing: give the prefix(es) written by megatron-based-preprocess")
    for prefix in d.path:
        for ext in (".bin", ".idx"):
            if not Path(prefix + ext).is_file():
                raise ConfigError(f"data.path: {prefix + ext} does not exist (run megatron-based-preprocess)")
    if d.weights is not None and len(d.weights) != len(d.path):
        raise ConfigError(f"data.weights has {len(d.weights)} entries for {len(d.path)} data.path prefixes")
    if not d.tokenizer_model:
        raise ConfigError("data.tokenizer_model is missing: give the sentencepiece .model used to preprocess")
    if not Path(d.tokenizer_model).is_file():
        raise ConfigError(f"data.tokenizer_model: {d.tokenizer_model} does not exist")
    try:
        spec = cfg.model_spec()  # the model section and its interplay with the parallel sizes
    except ConfigError:
        raise
    except ValueError as e:  # a check of Megatron's TransformerConfig that ours do not repeat
        raise ConfigError(f"model / parallel: {e}") from None
    # Megatron asserts the even split of the layers over the pipeline stages only when it builds the model; an
    # uneven split (these model keys) it checks itself
    uneven = ("num_layers_in_first_pipeline_stage", "num_layers_in_last_pipeline_stage",
              "pipeline_model_parallel_layout", "account_for_embedding_in_pipeline_split",
              "account_for_loss_in_pipeline_split")
    if spec.config.num_layers % p.pipeline_model_parallel_size and not any(getattr(spec.config, k) for k in uneven):
        raise ConfigError(f"num_layers ({spec.config.num_layers}, the layer_pattern length) must be divisible by "
                          f"parallel.pipeline_model_parallel_size ({p.pipeline_model_parallel_size})")
    if spec.seq_length % p.context_parallel_size:
        raise ConfigError(f"model.seq_length ({spec.seq_length}) must be divisible by "
                          f"parallel.context_parallel_size ({p.context_parallel_size})")
    if load_path is not None and t.engine == "megatron":
        try:
            check_architecture(load_path, spec)
        except CheckpointError as e:
            raise ConfigError(f"train.load (--load): {e}") from None
    try:
        vocab = load_tokenizer(d.tokenizer_model).vocab_size
    except DataError as e:
        raise ConfigError(f"data.tokenizer_model: {e}") from None
    if vocab > spec.vocab_size:
        raise ConfigError(f"model.vocab_size ({spec.vocab_size}) is smaller than the tokenizer's vocabulary "
                          f"({vocab}, {d.tokenizer_model}): set model.vocab_size={vocab}")
    try:
        check_split_sizes(d.path, d.split, spec.seq_length, t.eval_interval)
    except DataError as e:
        raise ConfigError(str(e)) from None
