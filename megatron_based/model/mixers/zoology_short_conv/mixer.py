"""The "Z" mixer: Zoology's BaseConv with a short convolution (``zoology/mixers/base_conv.py`` ``BaseConv`` with
``kernel_size=3``, ``zoology/mixers/convolution.py`` ``ShortConvolution``): per channel c of the normalised input u,
``y = (conv_k(u)_c + b_c) * (W u + b)_c + u_c`` with a causal depthwise kernel of ``config.conv_kernel_size`` taps
(tap k-1 multiplies the current token) and its bias (PyTorch's ``Conv1d``: ``U(-1/sqrt(k), 1/sqrt(k))``, which
Zoology keeps). The rest (gate projection, TP by channel, no output projection) is the H mixer's."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ..long_conv.mixer import LongConvBaseConv


class ZoologyShortConv(LongConvBaseConv):
    """Zoology's BaseConv with a short causal convolution (module docstring): ``[s, b, d] -> ([s, b, d], None)``.
    Decoding keeps the last k - 1 inputs of each sequence."""

    symbol = "Z"
    description = "Zoology's BaseConv with a short convolution"
    split_parameters = ("conv_weight", "conv_bias")

    @staticmethod
    def flops_per_token(config, seq_length: int) -> float:
        """The projection (2 d^2), the depthwise conv with its bias (2 k + 1 per channel), gate and skip (2 d)."""
        d = config.hidden_size
        return 2 * d * d + d * (2 * config.conv_kernel_size + 1) + 2 * d

    @staticmethod
    def parameter_count(config) -> tuple[int, int]:
        d = config.hidden_size
        return d * d + d + d * config.conv_kernel_size + d, 0

    @staticmethod
    def activation_width(config) -> int:
        return 4 * config.hidden_size

    def _init_conv(self, config, kw):
        d, k = config.hidden_size, config.conv_kernel_size
        self.kernel_size = k
        self.conv_weight = torch.nn.Parameter(torch.empty(self.channels, k, **kw))
        self.conv_bias = torch.nn.Parameter(torch.empty(self.channels, **kw))
        bound = 1.0 / math.sqrt(k)
        init = lambda w: torch.nn.init.uniform_(w, -bound, bound)  # noqa: E731
        if config.perform_initialization:
            with torch.no_grad():
                self._init_channel_split(self.conv_weight, k, init, config)
                if config.use_cpu_initialization:  # the full bias, then this rank's channels (TP-invariant)
                    rank = self.tp_group.rank()
                    full = torch.empty(d, dtype=config.params_dtype)
                    init(full)
                    self.conv_bias.copy_(full[rank * self.channels:(rank + 1) * self.channels])
                else:
                    from megatron.core.tensor_parallel.layers import _initialize_affine_weight_gpu

                    _initialize_affine_weight_gpu(self.conv_bias, init, partition_dim=0)

    def _short_conv(self, u):
        """u ``[s, b, c]`` -> the causal depthwise conv plus its bias ``[s, b, c]``."""
        x = u.permute(1, 2, 0)  # [b, c, s]
        y = F.conv1d(F.pad(x, (self.kernel_size - 1, 0)), self.conv_weight.unsqueeze(1).to(x.dtype),
                     self.conv_bias.to(x.dtype), groups=x.shape[1])
        return y.permute(2, 0, 1)

    def conv(self, u, cu_seqlens=None):
        if cu_seqlens is None:
            return self._short_conv(u)
        bounds = cu_seqlens.tolist()
        return torch.cat([self._short_conv(u[a:b]) for a, b in zip(bounds[:-1], bounds[1:])])

    # Generation: the state is the last k - 1 inputs of each sequence.
    def inference_cache(self, batch: int, dtype: torch.dtype, device, max_length: int | None = None) -> dict:
        """``conv [b, k - 1, channels]`` in the activation dtype."""
        return {"conv": torch.zeros(batch, self.kernel_size - 1, self.channels, dtype=dtype, device=device)}

    def prefill(self, hidden_states, cache: dict, prompts):
        """Packed prompts ``[T, 1, d]``: the parallel form, keeping each prompt's last k - 1 inputs."""
        gate, bias = self.linear_in(hidden_states)
        if bias is not None:
            gate = gate + bias
        u = self._local_input(hidden_states)
        bounds, keep = prompts.cu_seqlens.tolist(), self.kernel_size - 1
        for i, (a, b) in enumerate(zip(bounds[:-1], bounds[1:])):
            last = u[max(a, b - keep):b, 0]
            cache["conv"][i].zero_()
            if keep:
                cache["conv"][i, keep - last.shape[0]:] = last
        return self._output(self._mix(u, gate, prompts.cu_seqlens))

    def step(self, hidden_states, cache: dict, positions=None, **_):
        """One token per sequence ``[1, b, d]``, updating ``cache`` in place."""
        gate, bias = self.linear_in(hidden_states)
        if bias is not None:
            gate = gate + bias
        u = self._local_input(hidden_states)[0]  # [b, c]
        window = torch.cat([cache["conv"], u[:, None]], dim=1)  # [b, k, c]
        conv = (window * self.conv_weight.t().to(u.dtype)[None]).sum(1) + self.conv_bias.to(u.dtype)
        cache["conv"].copy_(window[:, 1:])
        return self._output((conv * gate[0] + u)[None])
