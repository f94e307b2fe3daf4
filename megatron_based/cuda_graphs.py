"""CUDA graphs for training steps: each decoder layer's forward and backward captured once, replayed every step.

A based-360m step at 32k tokens launches ~2,800 kernels; on an H100 the host (Python, autograd, Megatron's layer
code) takes longer to launch them than the GPU to run them, so the GPU waits (benchmarks/train_throughput.py
--profile reports the idle time and what it waited for). Replaying a layer's captured graph costs one launch.

``graph_decoder_layers`` uses PyTorch's ``torch.cuda.make_graphed_callables`` on the ``TransformerLayer`` objects
of a Megatron ``GPTModel`` (one shared memory pool, forward graphs in layer order and backward graphs in reverse,
like a step runs them). Parameter gradients leave the graphed backward as ordinary autograd gradients, so Megatron
DDP's gradient hooks (main_grad accumulation, bucketed reduce-scatter) run unchanged, as does the optimizer, which
updates the parameters in place (the graphs read them by address). Megatron-Core's own ``cuda_graph_impl="local"``
is the other route (benchmarks/train_throughput.py --cuda-graphs megatron); it needs its CUDA-graph-safe RNG
tracker and its schedules' ``create_cudagraphs`` call.

Limits (checked): fixed shapes (one micro-batch shape per captured model), no dropout, no activation recompute,
no packed sequences or attention masks in the graphed calls (they fall back to the eager layer only outside
training mode or without gradients).
"""
from __future__ import annotations

import torch


class _LayerCall(torch.nn.Module):
    """A layer's training forward as a function of ``hidden_states`` only (what make_graphed_callables wants)."""

    def __init__(self, layer: torch.nn.Module):
        super().__init__()
        self.layer = layer
        self.eager = layer.forward  # the original bound forward, kept before it is replaced

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        out, _ = self.eager(hidden_states=hidden_states, attention_mask=None)
        return out


def graph_decoder_layers(model: torch.nn.Module, micro_batch: int, seq_length: int, num_warmup_iters: int = 3):
    """Capture every layer of ``model.decoder`` (a Megatron ``GPTModel``, unwrapped from DDP) for inputs
    ``[s, micro_batch, hidden]``, s = this rank's ``seq_length`` share (divided by TP under sequence parallel).
    Afterwards ``layer(hidden_states=..., ...)`` replays the graphs in training mode with gradients enabled and
    runs the eager layer otherwise (evaluation, generation). Returns the number of layers captured."""
    config = model.config
    if not torch.cuda.is_available():
        raise RuntimeError("CUDA graphs need a GPU")
    if config.recompute_granularity is not None:
        raise ValueError("CUDA-graphed layers and activation recompute do not mix: drop one of them")
    if config.hidden_dropout or config.attention_dropout:
        raise ValueError("CUDA-graphed layers need hidden_dropout = attention_dropout = 0 (no RNG in the graphs)")
    if getattr(config, "cuda_graph_impl", "none") != "none":
        raise ValueError(f"the model already uses Megatron's CUDA graphs (cuda_graph_impl={config.cuda_graph_impl})")
    tp = config.tensor_model_parallel_size if config.sequence_parallel else 1
    if seq_length % tp:
        raise ValueError(f"seq_length {seq_length} must divide by the tensor-parallel size {tp}")
    layers = list(model.decoder.layers)
    calls = tuple(_LayerCall(layer) for layer in layers)
    shape = (seq_length // tp, micro_batch, config.hidden_size)
    samples = tuple((torch.randn(shape, device="cuda", dtype=config.params_dtype, requires_grad=True),)
                    for _ in layers)
    graphed = torch.cuda.make_graphed_callables(calls, samples, num_warmup_iters=num_warmup_iters)
    for layer, call, g in zip(layers, calls, graphed):
        layer.forward = _replaying(layer, call.eager, g, shape)
    return len(layers)


def _replaying(layer, eager, graphed, shape):
    def forward(hidden_states, attention_mask=None, **kwargs):
        if layer.training and torch.is_grad_enabled():
            if tuple(hidden_states.shape) != shape or attention_mask is not None or _given(kwargs):
                raise ValueError(f"a CUDA-graphed layer was captured for hidden_states {list(shape)} without mask, "
                                 f"packed sequences or rotary inputs; got {list(hidden_states.shape)}"
                                 f"{' and ' + ', '.join(_given(kwargs)) if _given(kwargs) else ''}")
            return graphed(hidden_states), None
        return eager(hidden_states=hidden_states, attention_mask=attention_mask, **kwargs)

    return forward


def _given(kwargs) -> list[str]:
    """Names of the call's keyword arguments that carry something (a graphed layer ignores none of them)."""
    return [k for k, v in kwargs.items() if v is not None and k != "context"]
