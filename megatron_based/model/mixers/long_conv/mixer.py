"""The "H" mixer: Zoology's BaseConv with a long, implicitly parameterised causal convolution.

Zoology (``zoology/mixers/base_conv.py`` ``BaseConv`` with ``kernel_size=-1`` and the default
``implicit_long_conv=True``, i.e. ``zoology/mixers/convolution.py`` ``ImplicitLongConvolution``) computes, per
channel c of the (normalised) layer input u ``[T, d]``::

    y = (k_c * u_c + u_c) * (W u + b)_c + u_c

with ``*`` the causal convolution ``(k * u)_t = sum_{s <= t} k_{t-s} u_s`` over the whole sequence (filter length
l_max = the sequence length), done as an FFT product of size 2T, and the filter given by a small MLP of fixed
positional features: ``k[:, n] = W2 ReLU(W1 z_n + b1) + b2`` with ``z_n = (n / (l_max - 1), cos(w_n), -sin(w_n))``,
``w_n = 2 pi 1e-4 n / l_max`` (one band of Zoology's ``PositionalEmbedding`` with ``d_emb = 3``, hidden width 16).
No activation on the gate, no output projection: the layer's d channels are the model's d channels. Zoology's
initialisation applies to every ``nn.Linear``: N(0, 0.02) weights, zero biases.

Tensor parallelism splits the d channels: rank r computes channels ``[r d/tp, (r+1) d/tp)`` (its slice of
``linear_in``'s output, of the filter MLP's last layer and of u) and the outputs are all-gathered. The filter MLP's
hidden layer is replicated; its input gradient is summed over the ranks (``copy_to_tensor_model_parallel_region``).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from megatron.core.tensor_parallel import ColumnParallelLinear
from megatron.core.tensor_parallel.layers import _initialize_affine_weight_cpu
from megatron.core.tensor_parallel.mappings import (
    copy_to_tensor_model_parallel_region,
    gather_from_sequence_parallel_region,
    gather_from_tensor_model_parallel_region,
    scatter_to_sequence_parallel_region,
    scatter_to_tensor_model_parallel_region,
)
from megatron.core.transformer import TransformerConfig
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.utils import ensure_metadata_has_dp_cp_group, make_sharded_tensors_for_checkpoint

from ..base import MixerModule, cu_seqlens_of

FILTER_FEATURES = 3  # Zoology's d_emb: t, cos, sin of one band
FILTER_HIDDEN = 16  # Zoology's d_hidden


def implicit_filter_positions(l_max: int, dtype=torch.float32, device=None) -> torch.Tensor:
    """Zoology's positional features of the implicit filter, ``[l_max, 3]``: ``n / (l_max - 1)``, ``cos w_n``,
    ``-sin w_n`` with ``w_n = 2 pi f n / l_max`` and the single band ``f = 1e-4`` (``d_emb = 3``)."""
    n = torch.arange(l_max, dtype=torch.float64, device=device)
    t = n / max(l_max - 1, 1)
    w = 2 * math.pi * 1e-4 * n / l_max
    return torch.stack([t, torch.cos(w), -torch.sin(w)], dim=-1).to(dtype)


def causal_fft_conv(u: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """``y_t = sum_{s <= t} k_{t-s} u_s`` along dim -2 of u ``[..., T, c]`` with the filter k ``[L, c]``
    (``L >= T``; taps beyond T cannot reach), by real FFTs of size 2T (no wrap-around), in fp32 (fp64 stays fp64).
    Returns u's dtype."""
    T = u.shape[-2]
    n = 2 * T
    work = torch.float64 if u.dtype == torch.float64 or k.dtype == torch.float64 else torch.float32
    u_f = torch.fft.rfft(u.to(work), n=n, dim=-2)
    k_f = torch.fft.rfft(k[:T].to(work), n=n, dim=-2)
    return torch.fft.irfft(u_f * k_f, n=n, dim=-2)[..., :T, :].to(u.dtype)


def long_conv_flops(d: int, T: int) -> tuple[float, float]:
    """FLOPs per token of a BaseConv whose convolution spans a length-T sequence, per channel O(T log T): ``(the
    projection 2 d^2, the gate and skips 4 d, a real FFT of size n = 2T and its inverse, counted 2.5 n log2 n each,
    and the spectral product, n / 2 + 1 complex products of 6; the filter's FFT, once per sequence)``, both divided
    by T where per sequence."""
    n = 2 * T
    fft = 2.5 * n * math.log2(n)
    return 2 * d * d + 4 * d + d * (2 * fft + 6 * (n // 2 + 1)) / T, d * fft / T


@dataclass
class LongConvSubmodules:
    """The linear layer of :class:`LongConvBaseConv` (a class or ``ModuleSpec``): ``linear_in``, the gate's
    projection ``W u + b`` (d -> d, column-parallel; Zoology's ``projection``)."""

    linear_in: ModuleSpec | type = ColumnParallelLinear


class LongConvBaseConv(MixerModule):
    """Zoology's BaseConv with an implicit long convolution (module docstring): ``[s, b, d] -> ([s, b, d], None)``.

    Needs ``config.long_conv_length`` (l_max, the filter length: the model's sequence length; ``build_model``
    sets it from ``max_sequence_length`` when it is 0). Sequences longer than l_max are refused. Decoding keeps
    the last l_max inputs of each sequence (the filter reaches back to the first token). No context parallelism
    (the config refuses it).
    """

    symbol = "H"
    description = "Zoology's BaseConv with a long implicit convolution"

    @classmethod
    def spec(cls, linear_in=ColumnParallelLinear) -> ModuleSpec:
        return ModuleSpec(module=cls, submodules=LongConvSubmodules(linear_in=linear_in))

    @staticmethod
    def flops_per_token(config, seq_length: int) -> float:
        """:func:`long_conv_flops` plus the filter MLP on T positions, once per sequence, divided by T."""
        d, T = config.hidden_size, seq_length
        conv, filter_fft = long_conv_flops(d, T)
        return conv + filter_fft + 2 * (FILTER_FEATURES * FILTER_HIDDEN + FILTER_HIDDEN * d)

    @staticmethod
    def parameter_count(config) -> tuple[int, int]:
        d = config.hidden_size
        # split: the projection and its bias, the filter MLP's last layer and bias; replicated: its hidden layer
        return d * d + d + FILTER_HIDDEN * d + d, FILTER_FEATURES * FILTER_HIDDEN + FILTER_HIDDEN

    @staticmethod
    def activation_width(config) -> int:
        # u, the projection, the conv output (and the FFT's complex spectra of size 2T, ~2 x 2 per channel)
        return 7 * config.hidden_size

    def __init__(self, config: TransformerConfig, layer_number: int = 1, pg_collection=None,
                 submodules: LongConvSubmodules | None = None, **injected):
        super().__init__(config, layer_number, pg_collection, **injected)
        submodules = submodules or LongConvSubmodules()
        d = config.hidden_size
        if self.cp_size > 1:
            raise ValueError(f"the {self.symbol} mixer ({self.description}) does not support context parallelism")
        if d % self.tp_size:
            raise ValueError(f"the {self.symbol} mixer: hidden_size ({d}) must be divisible by TP ({self.tp_size})")
        self.channels = d // self.tp_size
        self.sequence_parallel = bool(config.sequence_parallel)
        self.linear_in = self.column_parallel(submodules.linear_in, d, d, bias=True, tp_comm_buffer_name="fc1")
        device = None if config.use_cpu_initialization else torch.cuda.current_device()
        self._init_conv(config, {"dtype": config.params_dtype, "device": device})
        for name in self.split_parameters:
            p = getattr(self, name)
            setattr(p, "tensor_model_parallel", True)
            setattr(p, "partition_dim", 0)
            setattr(p, "partition_stride", 1)

    split_parameters = ("filter_w2", "filter_b2")  # the conv's parameters split by channel over TP

    def _filter_length(self, config) -> int:
        """``config.long_conv_length``, the filter's taps (refused when 0: build_model sets it)."""
        l_max = getattr(config, "long_conv_length", 0)
        if not l_max:
            raise ValueError(f"the {self.symbol} mixer ({self.description}) needs config.long_conv_length, its filter "
                             "length (the sequence length; build_model sets it from max_sequence_length)")
        return l_max

    def _init_channel_split(self, param, columns: int, init, config) -> None:
        """Initialise ``param`` ``[channels, columns]``, this rank's channels of a ``[hidden_size, columns]`` weight,
        with ``init``: on CPU the full weight, then this rank's rows (the same model at any TP size), on the GPU
        Megatron's per-rank draw."""
        if config.use_cpu_initialization:
            _initialize_affine_weight_cpu(param, config.hidden_size, columns, self.channels, 0, init,
                                          params_dtype=config.params_dtype, rank=self.tp_group.rank(),
                                          world_size=self.tp_size)
        else:
            from megatron.core.tensor_parallel.layers import _initialize_affine_weight_gpu

            _initialize_affine_weight_gpu(param, init, partition_dim=0)

    def _init_conv(self, config, kw):
        """The implicit filter's MLP: a replicated hidden layer, a channel-split output layer."""
        std = config.init_method_std
        self.l_max = self._filter_length(config)
        # the implicit filter's MLP (replicated hidden layer, channel-split output layer); Zoology: N(0, 0.02), 0
        self.filter_w1 = torch.nn.Parameter(torch.empty(FILTER_HIDDEN, FILTER_FEATURES, **kw))
        self.filter_b1 = torch.nn.Parameter(torch.zeros(FILTER_HIDDEN, **kw))
        self.filter_w2 = torch.nn.Parameter(torch.empty(self.channels, FILTER_HIDDEN, **kw))
        self.filter_b2 = torch.nn.Parameter(torch.zeros(self.channels, **kw))
        init = lambda w: torch.nn.init.normal_(w, 0.0, std)  # noqa: E731
        if config.perform_initialization:
            with torch.no_grad():
                init(self.filter_w1)  # replicated: the same draw on every rank
                self._init_channel_split(self.filter_w2, FILTER_HIDDEN, init, config)

    def filter(self, length: int) -> torch.Tensor:
        """This rank's filter taps ``[length, channels]`` (fp32 or wider)."""
        if length > self.l_max:
            raise ValueError(f"the {self.symbol} mixer's filter has {self.l_max} taps (long_conv_length); "
                             f"got a sequence of {length}")
        return self._taps(length)

    def _taps(self, length: int) -> torch.Tensor:
        """The first ``length`` taps (checked by ``filter``): the MLP of the positional features."""
        w1 = self.filter_w1
        dtype = torch.float64 if w1.dtype == torch.float64 else torch.float32
        z = implicit_filter_positions(self.l_max, dtype, w1.device)[:length]  # not a buffer: no bf16 cast
        h = torch.relu(z @ w1.to(dtype).t() + self.filter_b1.to(dtype))
        h = copy_to_tensor_model_parallel_region(h, group=self.tp_group) if self.tp_size > 1 else h
        return h @ self.filter_w2.to(dtype).t() + self.filter_b2.to(dtype)

    def _local_input(self, hidden_states):
        """This rank's channels of the full-sequence input ``[s, b, c]``."""
        if self.tp_size == 1:
            return hidden_states
        if self.sequence_parallel:
            full = gather_from_sequence_parallel_region(hidden_states, group=self.tp_group)
            r = self.tp_group.rank()
            return full[..., r * self.channels:(r + 1) * self.channels]
        return scatter_to_tensor_model_parallel_region(hidden_states, group=self.tp_group)

    def _output(self, y):
        """``[s, b, c]`` -> ``([s, b, d]`` (``[s/tp, b, d]`` under sequence parallel), None)."""
        if self.tp_size > 1:
            y = gather_from_tensor_model_parallel_region(y, group=self.tp_group)
            if self.sequence_parallel:
                y = scatter_to_sequence_parallel_region(y, group=self.tp_group)
        return y, None

    def conv(self, u, cu_seqlens=None):
        """u ``[s, b, c]`` -> ``k * u + u`` (Zoology's ``fft_conv`` adds u); packed documents (``cu_seqlens``)
        each from 0."""
        bounds = [0, u.shape[0]] if cu_seqlens is None else cu_seqlens.tolist()
        k = self.filter(max(b - a for a, b in zip(bounds[:-1], bounds[1:])))
        conv = torch.cat([causal_fft_conv(u[a:b].transpose(0, 1), k).transpose(0, 1)
                          for a, b in zip(bounds[:-1], bounds[1:])])
        return conv + u

    def _mix(self, u, gate, cu_seqlens=None):
        """u, gate ``[s, b, c]`` -> Zoology's BaseConv ``conv(u) * gate + u``."""
        return self.conv(u, cu_seqlens) * gate + u

    def forward(self, hidden_states: torch.Tensor, attention_mask=None, packed_seq_params=None, **_):
        """hidden_states ``[s, b, d]`` (``[s/tp, b, d]`` under sequence parallel) -> ``(out, None)``."""
        gate, bias = self.linear_in(hidden_states)
        if bias is not None:
            gate = gate + bias
        u = self._local_input(hidden_states)
        return self._output(self._mix(u, gate, cu_seqlens_of(packed_seq_params)))

    # Generation: the filter reaches back to the first token, so the state is every input so far (up to l_max).
    def inference_cache(self, batch: int, dtype: torch.dtype, device, max_length: int | None = None) -> dict:
        """``u [b, l_max, channels]``: the inputs so far (activation dtype; ``step`` takes their count, the
        positions)."""
        self.inference_cache_check(max_length)
        return {"u": torch.zeros(batch, self.l_max, self.channels, dtype=dtype, device=device)}

    def prefill(self, hidden_states, cache: dict, prompts):
        """Packed prompts ``[T, 1, d]`` (documents at ``prompts.cu_seqlens``): the FFT form per prompt, keeping
        its inputs in ``cache``. Returns ``(out, None)`` like forward."""
        gate, bias = self.linear_in(hidden_states)
        if bias is not None:
            gate = gate + bias
        u = self._local_input(hidden_states)
        bounds = prompts.cu_seqlens.tolist()
        for i, (a, b) in enumerate(zip(bounds[:-1], bounds[1:])):
            cache["u"][i, :b - a] = u[a:b, 0]
        return self._output(self._mix(u, gate, prompts.cu_seqlens))

    def step(self, hidden_states, cache: dict, positions=None, **_):
        """One token per sequence ``[1, b, d]`` at ``positions [b]`` (its index in its sequence), updating ``cache``
        in place: the conv output is the dot product of the inputs so far with the reversed filter."""
        if positions is None:
            raise ValueError(f"the {self.symbol} mixer's step needs the positions of the tokens")
        gate, bias = self.linear_in(hidden_states)
        if bias is not None:
            gate = gate + bias
        u = self._local_input(hidden_states)[0]  # [b, c]
        pos = positions.to(u.device).long().reshape(-1)
        batch = torch.arange(u.shape[0], device=u.device)
        cache["u"][batch, pos.clamp(max=self.l_max - 1)] = u
        k = self.filter(self.l_max)  # [l_max, c]; a position >= l_max has no tap (an index error)
        lag = pos[:, None] - torch.arange(self.l_max, device=u.device)[None]  # [b, l_max]: t - s
        taps = k[lag.clamp(min=0)] * (lag >= 0)[..., None]  # [b, l_max, c]
        conv = (taps * cache["u"].to(taps.dtype)).sum(1).to(u.dtype)
        return self._output(((conv + u) * gate[0] + u)[None])

    def inference_cache_check(self, max_length):
        if max_length is not None and max_length > self.l_max:
            raise ValueError(f"the {self.symbol} mixer decodes at most {self.l_max} tokens (long_conv_length); "
                             f"asked for {max_length}")

    def sharded_state_dict(self, prefix="", sharded_offsets=(), metadata=None):
        """Checkpoint with global shapes: the conv's channel-split parameters split like ``linear_in``."""
        metadata = ensure_metadata_has_dp_cp_group(metadata)
        sd = super().sharded_state_dict(prefix, sharded_offsets, metadata)
        own = {name: getattr(self, name) for name in self.split_parameters}
        sd.update(make_sharded_tensors_for_checkpoint(own, prefix, {k: 0 for k in own}, sharded_offsets,
                                                      tp_group=self.tp_group, dp_cp_group=metadata["dp_cp_group"]))
        return sd


class ExplicitLongConvBaseConv(LongConvBaseConv):
    """The "E" mixer: Zoology's BaseConv with a long *explicit* convolution (``implicit_long_conv=False``:
    ``zoology/mixers/convolution.py`` ``LongConvolution``, a free filter ``nn.Parameter(torch.randn(d, l_max))``
    of l_max taps per channel, N(0, 1) as Zoology leaves it; Zoology's init touches only linear and embedding
    layers). Otherwise the H mixer: ``y = (k * u + u) * (W u + b) + u``, the FFT convolution, TP by channel, the
    decode state of every input so far. Zoology's BaseConv-only MQAR launch of 2023-10-29 ran either this filter or
    H's (docs/mqar.md, "Which model the published BaseConv numbers come from")."""

    symbol = "E"
    description = "Zoology's BaseConv with a long explicit convolution (a free filter per channel)"
    split_parameters = ("filter_taps",)

    @staticmethod
    def flops_per_token(config, seq_length: int) -> float:
        """:func:`long_conv_flops`: the H mixer's without the filter MLP."""
        return sum(long_conv_flops(config.hidden_size, seq_length))

    @staticmethod
    def parameter_count(config) -> tuple[int, int]:
        d = config.hidden_size
        return d * d + d + d * config.long_conv_length, 0

    def _init_conv(self, config, kw):
        self.l_max = self._filter_length(config)
        self.filter_taps = torch.nn.Parameter(torch.empty(self.channels, self.l_max, **kw))
        if config.perform_initialization:
            with torch.no_grad():  # torch.randn, as Zoology
                self._init_channel_split(self.filter_taps, self.l_max, lambda w: torch.nn.init.normal_(w, 0.0, 1.0),
                                         config)

    def _taps(self, length: int) -> torch.Tensor:
        """The first ``length`` taps of the free filter."""
        taps = self.filter_taps
        return taps[:, :length].t().to(torch.float64 if taps.dtype == torch.float64 else torch.float32)
