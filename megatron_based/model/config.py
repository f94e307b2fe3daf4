"""``BasedConfig``: Megatron's ``TransformerConfig`` plus the BASED mixers' settings, validated up front.

The defaults are the BASED reference (based-spec.md): pre-norm RMSNorm (eps 1e-5), SwiGLU MLP without biases,
dropout 0, N(0, 0.02) init with output projections scaled by 1/sqrt(2 * num_layers).
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import types
import typing
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
import yaml
from megatron.core.transformer import TransformerConfig

# The cuda_graph_impl values a model accepts (Megatron's field), and why only these
CUDA_GRAPH_IMPLS = ("none", "local")
CUDA_GRAPH_IMPLS_WHY = "Megatron-Core's per-layer CUDA graphs; the other implementations need TransformerEngine"


class ConfigError(ValueError):
    """A configuration value that cannot work; the message says what to change."""


def round_up(x: int, multiple: int) -> int:
    return -(-x // multiple) * multiple


def padded_vocab_size(vocab_size: int, divisible_by: int, tensor_model_parallel_size: int = 1) -> int:
    """Vocabulary padded to a multiple of ``divisible_by * tp`` (BASED: 50257 -> 50264 with 8 and TP=1)."""
    if vocab_size < 1 or divisible_by < 1:
        raise ConfigError(f"vocab_size ({vocab_size}) and make_vocab_size_divisible_by ({divisible_by}) must be >= 1")
    return round_up(vocab_size, divisible_by * tensor_model_parallel_size)


def default_ffn_hidden_size(hidden_size: int) -> int:
    """BASED's ``n_inner``: 2 * d rounded up to a multiple of 256."""
    return round_up(2 * hidden_size, 256)


LONG_FILTER_SYMBOLS = "HE"  # mixers whose filter spans the sequence: long_conv_length taps (0: the sequence length)


def uses_long_filter(pattern: str) -> bool:
    """Whether a layer pattern has a mixer with a filter of ``long_conv_length`` taps (H, E)."""
    return any(symbol in pattern for symbol in LONG_FILTER_SYMBOLS)


def validate_layer_pattern(pattern: str, num_layers: int | None = None) -> str:
    """One symbol per layer from the mixer registry (``megatron_based.model.mixers.registry``); returns the
    pattern unchanged or raises :class:`ConfigError`."""
    from .mixers.registry import mixer_descriptions  # the mixers do not import this module: no cycle

    mixers = mixer_descriptions()
    if not pattern:
        raise ConfigError(f"layer_pattern is empty: give one symbol per layer, e.g. 'CLSC' ({', '.join(mixers)})")
    for i, sym in enumerate(pattern):
        if sym not in mixers:
            known = ", ".join(f"{s} ({d})" for s, d in mixers.items())
            raise ConfigError(f"layer_pattern has unknown symbol {sym!r} at layer {i}; use one of: {known}")
    if num_layers and len(pattern) != num_layers:
        raise ConfigError(
            f"layer_pattern has {len(pattern)} symbols but num_layers is {num_layers}: give one symbol per layer "
            f"(or leave num_layers unset to take it from the pattern)"
        )
    return pattern


_GPU_TARGET: list[bool | None] = [None]  # planning_for's setting; None: this machine


def gpu_target() -> bool:
    """Whether configs resolve for GPUs: this machine's ``torch.cuda.is_available()``, unless :func:`planning_for`
    says otherwise. Decides the GPU defaults (fusions; ``train.precision: auto`` is bf16) and whether GPU-only
    settings (``cuda_graph_impl: local``, ``train.precision: bf16``) are accepted."""
    target = _GPU_TARGET[0]
    return torch.cuda.is_available() if target is None else target


@contextlib.contextmanager
def planning_for(gpu: bool):
    """Resolve configs inside the block as for GPU machines (``gpu=True``: a login node without GPUs checking the
    plan of a GPU job, as ``launch/submit.sh`` does) or for CPU ones; only checks and plans, never a model to run
    here (a model built for GPUs still needs one)."""
    before, _GPU_TARGET[0] = _GPU_TARGET[0], bool(gpu)
    try:
        yield
    finally:
        _GPU_TARGET[0] = before


@dataclass
class BasedConfig(TransformerConfig):
    """Megatron ``TransformerConfig`` with BASED defaults and the mixers' settings.

    BASED fields:
        layer_pattern: one symbol per layer: ``L`` Taylor linear attention, ``S`` sliding-window attention,
            ``C`` BaseConv, ``A`` softmax attention, or the symbol of a mixer added with
            ``megatron_based.model.mixers.register_mixer``. ``num_layers`` defaults to its length.
        feature_dim: Taylor feature dimension f of q and k per head (16); the state has 1 + f + f(f+1)/2
            features (the symmetric Taylor map).
        linear_attention_heads: heads of the L mixer (default ``num_attention_heads``); value head dim
            ``hidden_size / linear_attention_heads``.
        linear_attention_eps: added to the L mixer's denominator (inert: the denominator is >= (t+1)/2).
        swa_window: left window of the S mixer: query t attends keys t - window ... t (128).
        conv_kernel_size: BaseConv's depthwise kernel (3; tap k-1 multiplies the current token); also the Z mixer's.
        long_conv_length: filter length l_max of the H and E mixers (Zoology's BaseConv with a long implicit /
            explicit filter): the longest sequence they take. 0 (default): ``build_model`` sets it to
            ``max_sequence_length``.
        rope_base: RoPE base of the S and A mixers (full head dim, rotate-half).
        rope_fusion: the S and A mixers split q, k, v and apply RoPE in one kernel each way
            (``based_kernels.rope_split_qkv``: fp32 math from fp64-exact cos / sin), in training forwards and in
            generation's prefill and decode steps (at each token's position); False: Megatron's split +
            ``apply_rotary_pos_emb`` everywhere (the e2e comparison).
            (Megatron's own ``apply_rope_fusion`` is TransformerEngine's kernel, off here.)
        fp32_residual_connection (Megatron's field): the residual stream between layers (embedding output, every
            ``x + Mixer(..)`` and ``h + MLP(..)``, the pipeline stages' activations) in fp32 while the mixers and MLPs
            compute in the parameters' dtype: each RMSNorm reads the fp32 residual and writes the compute dtype
            (``megatron_based.model.norm``), Megatron's bias-dropout-add adds the bf16 outputs to it in fp32. The
            authors' models train so (``residual_in_fp32: true``). None (default): on when the parameters are bf16 or
            fp16 (``params_dtype``, or the ``bf16`` / ``fp16`` flags of a model Megatron-LM's Float16Module casts),
            off in fp32 / fp64 (nothing to gain; an fp64 reference model stays fp64). With it on,
            ``pipeline_dtype`` is fp32 (the stages exchange the residual).
        cuda_graph_impl (Megatron's field): "local" captures each layer's forward and backward in CUDA graphs
            after the first step and replays them (Megatron-Core's CudaGraphManager; training/loop.py seeds the
            CUDA-graph-safe RNG tracker it needs). An eager step launches ~1,700 kernels at based-360m's size; on an
            H100 the host could not keep up (docs/benchmarks.md). GPU only; fixed shapes, no recompute. Run configs
            also take "auto" (their default: graphs where they are verified; training.config.RunConfig.cuda_graphs);
            a model section built alone (``model_spec_from_dict``) reads "auto" as "none".
    """

    layer_pattern: str = ""
    feature_dim: int = 16
    linear_attention_heads: int | None = None
    linear_attention_eps: float = 1e-12
    swa_window: int = 128
    conv_kernel_size: int = 3
    long_conv_length: int = 0
    rope_base: float = 10000.0
    rope_fusion: bool = True

    # BASED defaults for Megatron fields.
    num_layers: int = 0
    normalization: str = "RMSNorm"
    layernorm_epsilon: float = 1e-5
    gated_linear_unit: bool = True
    activation_func: Callable[[torch.Tensor], torch.Tensor] = F.silu
    add_bias_linear: bool = False
    hidden_dropout: float = 0.0
    attention_dropout: float = 0.0
    init_method_std: float = 0.02
    # Megatron's fused SwiGLU, bias-dropout-add and cross-entropy (torch.compile'd by Megatron's jit_fuser) on GPU
    # machines; plain ops on CPU ones (no compiler needed there). The unfused SwiGLU and fp32 cross entropy were
    # ~18% of based-360m's training step on an H100 (benchmarks/train_throughput.py --profile). The fused cross
    # entropy returns its logits gradient in bf16, so by default it is on for bf16 runs only (None: decided here).
    bias_activation_fusion: bool = dataclasses.field(default_factory=gpu_target)
    bias_dropout_fusion: bool = dataclasses.field(default_factory=gpu_target)
    cross_entropy_loss_fusion: bool | None = None
    # The fused cross entropy: "triton" (based_kernels.cross_entropy, bf16 logits read once per pass; the PyTorch
    # reference for CPU logits) or Megatron's "native" (torch.compile'd, fp32 copies) / "te".
    cross_entropy_fusion_impl: str = "triton"
    apply_rope_fusion: bool = False
    masked_softmax_fusion: bool = False
    persist_layer_norm: bool = False
    gradient_accumulation_fusion: bool = False
    fp32_residual_connection: bool | None = None  # None: on for bf16 / fp16 parameters (see above)

    def __post_init__(self):
        if self.fp32_residual_connection is None:
            self.fp32_residual_connection = bool(self.params_dtype in (torch.bfloat16, torch.float16)
                                                 or self.bf16 or self.fp16)
        if not isinstance(self.fp32_residual_connection, bool):
            raise ConfigError(f"fp32_residual_connection must be true or false; got {self.fp32_residual_connection!r}")
        if self.fp32_residual_connection and self.pipeline_dtype not in (None, torch.float32):
            # the pipeline stages exchange the residual stream: Megatron's __post_init__ would override this too,
            # with a warning; here it is the documented meaning of the field
            self.pipeline_dtype = torch.float32
        if self.cross_entropy_loss_fusion is None:
            self.cross_entropy_loss_fusion = gpu_target() and self.bf16
        if not isinstance(self.rope_fusion, bool):
            raise ConfigError(f"rope_fusion must be true or false; got {self.rope_fusion!r}")
        if self.normalization != "RMSNorm":
            # every layer and the final norm are megatron_based.model.norm.RMSNorm (spec.py): another value would be
            # ignored, so it is refused instead
            raise ConfigError(f"normalization must be RMSNorm (BASED's layers, as released, use RMSNorm; other norms "
                              f"are not implemented); got {self.normalization!r}")
        if self.cuda_graph_impl not in CUDA_GRAPH_IMPLS:
            raise ConfigError(f"cuda_graph_impl must be {' or '.join(map(repr, CUDA_GRAPH_IMPLS))} "
                              f"({CUDA_GRAPH_IMPLS_WHY}); got {self.cuda_graph_impl!r}")
        if self.cuda_graph_impl == "local" and self.recompute_granularity == "full":
            raise ConfigError("cuda_graph_impl: local and full activation recompute do not mix (Megatron's per-layer "
                              "graphs refuse it): drop one of them")
        if self.cuda_graph_impl == "local" and not gpu_target():
            raise ConfigError("cuda_graph_impl: local needs a GPU; set it to none on CPU (planning a GPU job from a "
                              "machine without GPUs: --gpu on the dry run)")
        if self.cross_entropy_fusion_impl not in ("triton", "native", "te"):
            raise ConfigError(f"cross_entropy_fusion_impl must be 'triton', 'native' or 'te'; got "
                              f"{self.cross_entropy_fusion_impl!r}")
        validate_layer_pattern(self.layer_pattern, self.num_layers)
        self.num_layers = len(self.layer_pattern)
        tp = self.tensor_model_parallel_size
        for key in ("hidden_size", "num_attention_heads"):
            if getattr(self, key) < 1:
                raise ConfigError(f"{key} ({getattr(self, key)}) must be >= 1")
        if self.hidden_size % self.num_attention_heads:
            raise ConfigError(
                f"hidden_size ({self.hidden_size}) must be divisible by num_attention_heads "
                f"({self.num_attention_heads})"
            )
        if self.num_attention_heads % tp:
            raise ConfigError(
                f"num_attention_heads ({self.num_attention_heads}) must be divisible by "
                f"tensor_model_parallel_size ({tp})"
            )
        if self.linear_attention_heads is None:
            self.linear_attention_heads = self.num_attention_heads
        if "L" in self.layer_pattern:
            if self.hidden_size % self.linear_attention_heads:
                raise ConfigError(
                    f"hidden_size ({self.hidden_size}) must be divisible by linear_attention_heads "
                    f"({self.linear_attention_heads})"
                )
            if self.linear_attention_heads % tp:
                raise ConfigError(
                    f"linear_attention_heads ({self.linear_attention_heads}) must be divisible by "
                    f"tensor_model_parallel_size ({tp})"
                )
            if not 1 <= self.feature_dim <= 64:
                raise ConfigError(f"feature_dim ({self.feature_dim}) must be in 1..64 (BASED uses 16)")
        if "S" in self.layer_pattern and self.swa_window < 1:
            raise ConfigError(f"swa_window ({self.swa_window}) must be >= 1 (BASED uses 128)")
        if "C" in self.layer_pattern:
            if not 2 <= self.conv_kernel_size <= 4:
                raise ConfigError(f"conv_kernel_size ({self.conv_kernel_size}) must be in 2..4 (BASED uses 3)")
            if (2 * self.hidden_size) % tp:
                raise ConfigError(
                    f"BaseConv channels 2 * hidden_size ({2 * self.hidden_size}) must be divisible by "
                    f"tensor_model_parallel_size ({tp})"
                )
        if "Z" in self.layer_pattern and not 1 <= self.conv_kernel_size <= 64:
            raise ConfigError(f"conv_kernel_size ({self.conv_kernel_size}) must be in 1..64 (Zoology uses 3)")
        for symbol in "HZE":
            if symbol not in self.layer_pattern:
                continue
            if self.hidden_size % tp:
                raise ConfigError(f"the {symbol} mixer's channels, hidden_size ({self.hidden_size}), must be divisible "
                                  f"by tensor_model_parallel_size ({tp})")
            if self.context_parallel_size > 1:
                raise ConfigError(f"the {symbol} mixer (Zoology's BaseConv) does not support context parallelism "
                                  f"(context_parallel_size {self.context_parallel_size})")
        if uses_long_filter(self.layer_pattern):
            if self.long_conv_length < 0:
                raise ConfigError(f"long_conv_length ({self.long_conv_length}) must be >= 0 (0: the sequence length)")
        if self.ffn_hidden_size is None:
            self.ffn_hidden_size = default_ffn_hidden_size(self.hidden_size)
        if self.ffn_hidden_size % tp:
            raise ConfigError(
                f"ffn_hidden_size ({self.ffn_hidden_size}) must be divisible by tensor_model_parallel_size ({tp})"
            )
        super().__post_init__()

    @classmethod
    def field_names(cls) -> set[str]:
        return {f.name for f in dataclasses.fields(cls)}


BASED_FIELDS = tuple(sorted(BasedConfig.field_names() - {f.name for f in dataclasses.fields(TransformerConfig)}))
# The TransformerConfig fields whose Megatron defaults __post_init__ derives others from (ffn_hidden_size,
# kv_channels, num_query_groups, the init methods): a reference config built from them shows which fields a plain
# config's author set.
_DERIVATION_ANCHORS = ("num_layers", "hidden_size", "num_attention_heads", "init_method_std")


def missing_based_fields(config) -> list[str]:
    """The BASED fields (:data:`BASED_FIELDS`) that ``config`` lacks: all of them for a plain TransformerConfig."""
    return [name for name in BASED_FIELDS if not hasattr(config, name)]


def _same(a, b) -> bool:
    if isinstance(a, functools.partial) and isinstance(b, functools.partial):  # Megatron's init methods
        return a.func is b.func and a.args == b.args and a.keywords == b.keywords
    try:
        return a is b or bool(a == b)
    except Exception:  # noqa: BLE001 - values without a plain truth value (tensors) count as set
        return False


def as_based_config(config: TransformerConfig, **based_fields) -> BasedConfig:
    """``config`` as a :class:`BasedConfig`. A ``BasedConfig`` comes back as it is (set BASED fields on it, not
    here). A plain Megatron ``TransformerConfig`` is converted: fields set to other values than Megatron's defaults
    are kept, the ones at Megatron's defaults (LayerNorm, GeLU MLP of 4 * hidden_size, biases, dropout 0.1: a GPT-2
    layer) take BASED's, and ``based_fields`` (any BasedConfig field; ``layer_pattern`` is required) come on top."""
    if isinstance(config, BasedConfig):
        if based_fields:
            raise ConfigError(f"config is already a BasedConfig: set {', '.join(sorted(based_fields))} on it "
                              "rather than as keyword arguments")
        return config
    if not isinstance(config, TransformerConfig):
        raise ConfigError(f"config must be a BasedConfig or a Megatron TransformerConfig; got {type(config).__name__}")
    unknown = sorted(set(based_fields) - BasedConfig.field_names())
    if unknown:
        raise ConfigError(f"unknown BasedConfig field(s) {unknown}: the BASED fields are {', '.join(BASED_FIELDS)}")
    if not based_fields.get("layer_pattern"):
        raise ConfigError("a plain TransformerConfig needs layer_pattern=...: one symbol per layer, L (Taylor linear "
                          "attention), S (sliding-window attention), C (BaseConv) or A (softmax attention), e.g. "
                          "layer_pattern='CLSC'")
    anchors = {name: getattr(config, name) for name in _DERIVATION_ANCHORS}
    reference = TransformerConfig(**anchors)
    chosen = {f.name: getattr(config, f.name) for f in dataclasses.fields(TransformerConfig)
              if f.init and not _same(getattr(config, f.name), getattr(reference, f.name))}
    return BasedConfig(**{**anchors, **chosen, **based_fields})


@dataclass
class ModelSpec:
    """A YAML ``model:`` section: the ``BasedConfig`` plus what GPTModel takes beside it."""

    config: BasedConfig
    vocab_size: int
    make_vocab_size_divisible_by: int = 8
    seq_length: int = 2048

    def __post_init__(self):
        if isinstance(self.seq_length, bool) or not isinstance(self.seq_length, int) or self.seq_length < 1:
            raise ConfigError(f"model.seq_length ({self.seq_length!r}) must be a positive integer: the tokens per "
                              "training sequence (BASED uses 2048)")
        for key in ("vocab_size", "make_vocab_size_divisible_by"):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"model.{key} ({value!r}) must be a positive integer")

    @property
    def padded_vocab_size(self) -> int:
        return padded_vocab_size(self.vocab_size, self.make_vocab_size_divisible_by,
                                 self.config.tensor_model_parallel_size)


MODEL_SECTION_EXTRAS = ("vocab_size", "make_vocab_size_divisible_by", "seq_length")


def read_yaml_file(path) -> object:
    """A config file's parsed YAML (None for an empty file); a :class:`ConfigError` naming the file where it is not
    valid YAML. Every tool reads its config files through this (and :func:`model_section`)."""
    try:
        with open(path) as fh:
            return yaml.safe_load(fh)
    except yaml.YAMLError as e:
        raise ConfigError(f"config file {path} is not valid YAML ({' '.join(str(e).split())})") from None


def model_section(raw, where) -> dict:
    """The ``model:`` mapping of a parsed config; a :class:`ConfigError` naming ``where`` (the file) if it has none."""
    section = raw.get("model") if isinstance(raw, dict) else None
    if not isinstance(section, dict):
        raise ConfigError(f"{where} has no model: section (a mapping of the model's keys, as in configs/tiny.yaml)")
    return section


def read_model_section(path) -> dict:
    """The ``model:`` section of the YAML config file ``path``."""
    return model_section(read_yaml_file(path), path)


def model_spec_from_dict(section: dict, **config_overrides) -> ModelSpec:
    """Build a :class:`ModelSpec` from a YAML ``model:`` mapping; unknown keys are rejected by name."""
    section = dict(section)
    if section.get("cuda_graph_impl") == "auto":  # a run config's choice (training.config); a model alone: eager
        section.pop("cuda_graph_impl")
    extras = {k: section.pop(k) for k in MODEL_SECTION_EXTRAS if k in section}
    if "vocab_size" not in extras:
        raise ConfigError("model.vocab_size is missing: set it to the tokenizer's vocabulary size")
    unknown = sorted(set(section) - BasedConfig.field_names())
    if unknown:
        raise ConfigError(f"unknown model key(s) {unknown}: see docs/training.md for the model keys")
    hints = typing.get_type_hints(BasedConfig)
    section = {key: _check_type(key, value, hints[key]) for key, value in section.items()}
    return ModelSpec(config=BasedConfig(**section, **config_overrides), **extras)


_SCALARS = (bool, int, float, str)  # the types a YAML value has; fields of other types are not checked here


def _check_type(key: str, value, hint):
    """``value`` of ``model.<key>`` if it fits the field's type; a :class:`ConfigError` naming the key if the field is
    a bool, int, float or str (or one of them or None) and the value is not (:func:`check_scalar`; a str field takes
    no number: layer_pattern 123 is a mistake, not a pattern)."""
    options = typing.get_args(hint) if typing.get_origin(hint) in (typing.Union, types.UnionType) else (hint,)
    if value is None and type(None) in options:
        return None
    scalars = [t for t in options if t in _SCALARS]
    if len(scalars) < len([t for t in options if t is not type(None)]):
        return value  # a callable, dtype, list or Literal field: Megatron's own checks
    return check_scalar(f"model.{key}", value, scalars, nullable=type(None) in options)


def check_scalar(where: str, value, types_: list, *, nullable: bool = False, str_from_number: bool = False):
    """The config value ``value`` of ``where`` (e.g. ``train.lr``) as the first of the scalar types ``types_`` (bool,
    int, float, str) it fits, as YAML typed it: a float takes an int or a string like 1e-5 that YAML leaves
    unparsed, an int never takes a bool, and with ``str_from_number`` a str takes an int or float. Else a
    :class:`ConfigError` naming ``where`` and the types (``or null`` with ``nullable``). The run config's sections
    (training.config) and the model section check their values through this."""
    for t in types_:
        if t is float and isinstance(value, (int, float, str)) and not isinstance(value, bool):
            try:  # YAML reads 1e-3 (no dot) as a string
                return float(value)
            except ValueError:
                continue
        if t is str and str_from_number and isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)
        if isinstance(value, t) and not (t is int and isinstance(value, bool)):
            return value
    names = [t.__name__ for t in types_] + (["null"] if nullable else [])
    raise ConfigError(f"{where} must be {' or '.join(names)}, got {value!r}")
