"""RMSNorm that works with Megatron sequence parallelism without TransformerEngine or apex."""
from __future__ import annotations

import torch
from megatron.core.transformer import TransformerConfig

import based_kernels


class RMSNorm(torch.nn.Module):
    """``y = x / sqrt(mean(x^2) + eps) * weight``, computed in fp32 and returned in the input dtype, except with an
    fp32 residual stream (``config.fp32_residual_connection``, BASED's default): an fp32 input from a model whose
    parameters are in a lower precision is normed into the parameters' dtype (``config.params_dtype``, bf16 in bf16
    runs), so the mixer, the MLP and the output layer after it compute in that dtype against their weights. The
    statistics come from the fp32 values and y is rounded once (``based_kernels.rms_norm(..., out_dtype=...)``: in
    the Triton kernel's store, no extra pass); the gradient flows back to the residual in fp32.

    Built like Megatron's norms (``RMSNorm(config=..., hidden_size=..., eps=...)``). Under sequence parallelism
    each TP rank normalizes its own slice of the sequence, so the weight gradient is partial: the weight is marked
    ``sequence_parallel`` and Megatron's ``finalize_model_grads`` all-reduces it over the TP group (Megatron's own
    torch norm refuses sequence parallel instead).
    """

    def __init__(self, config: TransformerConfig, hidden_size: int, eps: float = 1e-5, **_):
        super().__init__()
        self.eps = eps
        device = None if config.use_cpu_initialization else torch.cuda.current_device()
        self.weight = torch.nn.Parameter(torch.ones(hidden_size, dtype=config.params_dtype, device=device))
        setattr(self.weight, "sequence_parallel", config.sequence_parallel)
        self.fp32_residual = bool(getattr(config, "fp32_residual_connection", False))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # based_kernels.rms_norm: Triton forward + backward for CUDA tensors (fp32 statistics, output in x's dtype,
        # weight.to(x.dtype) like F.rms_norm), F.rms_norm on CPU or under based_kernels.use_backend("torch"). The
        # unfused fp32 formula was 31% of based-360m's GPU time per training step on an H100; the Triton kernels
        # took the norms from 16.7 to 10.9 ms per step against F.rms_norm (docs/benchmarks.md).
        # The compute dtype is the weight's (config.params_dtype; also right for a model cast after it was built).
        return based_kernels.rms_norm(x, self.weight, self.eps, out_dtype=self._out_dtype(x.dtype))

    def residual_forward(self, residual: torch.Tensor, x: torch.Tensor,
                         bias: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """``(self(h), h)`` with ``h = residual + (x + bias)`` in the residual's dtype (Megatron's bias-dropout-add
        at inference: x and bias cast to it first): the residual add before this norm and the norm in one pass
        (``based_kernels.add_rms_norm``; one kernel on the GPU instead of one or two adds and the norm). For
        inference (generation's layer loop): no backward."""
        return based_kernels.add_rms_norm(x, residual, self.weight, self.eps, bias=bias,
                                          out_dtype=self._out_dtype(residual.dtype))

    def _out_dtype(self, dtype: torch.dtype) -> torch.dtype | None:
        if self.fp32_residual and dtype == torch.float32 and self.weight.dtype != torch.float32:
            return self.weight.dtype
        return None
