"""Run Megatron-Core's tensor-parallel layers on machines without CUDA (gloo process groups).

Megatron-Core assumes CUDA in two places our CPU runs reach (see docs/architecture.md):
1. ``torch.cuda.current_device()`` picks the device of buffers (e.g. the sequence-parallel all-gather); on a
   CPU-only machine it is redirected to the CPU device.
2. The model-parallel RNG tracker stores and swaps CUDA generator states; here it uses the CPU generator.
3. Megatron's DDP waits on ``torch.cuda.current_stream()`` before reducing gradients (for CUDA-graph replays);
   on CPU there is nothing to wait for, so it gets a stream whose waits do nothing.
4. Megatron's pipeline schedules create their token counter with ``device="cuda"`` and the pipeline P2P code calls
   ``torch.cuda.synchronize()``: the schedules module sees a ``torch`` whose ``zeros`` puts "cuda" tensors on the
   CPU, and the synchronize is a no-op (CPU work is synchronous).
(The other known one, Megatron's torch norm refusing sequence parallel, is handled for every device by
``megatron_based.norm.RMSNorm``.) Nothing is patched when CUDA is available.
"""
from __future__ import annotations

import torch

_applied = False


class _NullStream:
    """Stands in for ``torch.cuda.current_stream()`` on CPU: work is synchronous, waits are no-ops."""

    def wait_event(self, event):
        pass

    def wait_stream(self, stream):
        pass


class _TorchOnCpu:
    """``torch`` as Megatron's pipeline schedules see it on CPU: ``zeros(..., device="cuda")`` lands on the CPU."""

    def __getattr__(self, name):
        return getattr(torch, name)

    @staticmethod
    def zeros(*size, device=None, **kwargs):
        return torch.zeros(*size, device="cpu" if device == "cuda" else device, **kwargs)


def _tie_embeddings_on_cpu():
    """Pipeline parallelism ties the first stage's embedding to the last stage's output layer with an all-reduce
    of ``weight.data.cuda()``; on CPU the weight stays where it is for that call."""
    from megatron.core.models.common.language_module.language_module import LanguageModule

    setup = LanguageModule.setup_embeddings_and_output_layer

    def setup_on_cpu(self):
        cuda = torch.Tensor.cuda
        torch.Tensor.cuda = lambda t, *args, **kwargs: t
        try:
            return setup(self)
        finally:
            torch.Tensor.cuda = cuda

    LanguageModule.setup_embeddings_and_output_layer = setup_on_cpu


def apply_cpu_shims() -> bool:
    """Patch the two CUDA assumptions if CUDA is absent. Idempotent; returns True if the shims are active."""
    global _applied
    if torch.cuda.is_available():
        return False
    if _applied:
        return True
    from megatron.core.tensor_parallel import random as mrandom

    torch.cuda.current_device = lambda: torch.device("cpu")
    torch.cuda.current_stream = lambda device=None: _NullStream()
    torch.cuda.synchronize = lambda device=None: None
    from megatron.core.pipeline_parallel import schedules

    schedules.torch = _TorchOnCpu()
    _tie_embeddings_on_cpu()

    def add(self, name, seed):
        if seed in self.seeds_:
            raise Exception(f"seed {seed} already exists")
        if name in self.states_:
            raise Exception(f"rng state {name} already exists")
        self.seeds_.add(seed)
        self.states_[name] = torch.Generator().manual_seed(seed).get_state()

    mrandom.CudaRNGStatesTracker.add = add
    mrandom._get_cuda_rng_state = lambda *args, **kwargs: torch.get_rng_state()
    mrandom._set_cuda_rng_state = lambda state, *args, **kwargs: torch.set_rng_state(state)
    torch.cuda.manual_seed = torch.cuda.manual_seed_all = lambda seed: None  # the CPU seed is set by the caller
    _applied = True
    return True
