"""Run Megatron-Core's tensor-parallel layers on machines without CUDA (gloo process groups).

Megatron-Core assumes CUDA in these places our CPU runs reach (see docs/architecture.md):
1. ``torch.cuda.current_device()`` picks the device of buffers (e.g. the sequence-parallel all-gather); on a
   CPU-only machine it is redirected to the CPU device.
2. The model-parallel RNG tracker stores and swaps CUDA generator states; here it uses the CPU generator.
3. Megatron's DDP waits on ``torch.cuda.current_stream()`` before reducing gradients (for CUDA-graph replays);
   on CPU there is nothing to wait for, so it gets a stream whose waits do nothing.
4. Megatron's pipeline schedules create their token counter with ``device="cuda"`` and the pipeline P2P code calls
   ``torch.cuda.synchronize()``: the schedules module sees a ``torch`` whose ``zeros`` puts "cuda" tensors on the
   CPU, and the synchronize is a no-op (CPU work is synchronous).
5. Megatron's optimizers (the distributed optimizer included), gradient clipping and grad scaler create their
   flags with ``device="cuda"`` and sort parameters by ``param.type()`` names (``'torch.cuda.FloatTensor'``):
   those modules see the same ``torch`` (``tensor``/``zeros``/``empty`` land on the CPU) and, while they build
   their parameter groups or clip, a CPU tensor's ``type()`` reads as its CUDA twin. With these the CPU runs the
   optimizer GPU users run (``DistributedOptimizer`` and its sharded checkpoint state), not a stand-in.
(The other known one, Megatron's torch norm refusing sequence parallel, is handled for every device by
``megatron_based.model.norm.RMSNorm``.) Nothing is patched when CUDA is available.
"""
from __future__ import annotations

import functools

import torch

_applied = False


class _NullStream:
    """Stands in for ``torch.cuda.current_stream()`` on CPU: work is synchronous, waits are no-ops."""

    def wait_event(self, event):
        pass

    def wait_stream(self, stream):
        pass


def _on_cpu(factory):
    def make(*args, device=None, **kwargs):
        return factory(*args, device="cpu" if device == "cuda" else device, **kwargs)

    return staticmethod(make)


class _TorchOnCpu:
    """``torch`` as Megatron's schedules and optimizers see it on CPU: tensors made with ``device="cuda"`` land on
    the CPU."""

    def __getattr__(self, name):
        return getattr(torch, name)

    zeros = _on_cpu(torch.zeros)
    tensor = _on_cpu(torch.tensor)
    empty = _on_cpu(torch.empty)


def _as_if_cuda(fn):
    """``fn`` during which CPU tensors pass for CUDA ones: ``t.cuda()`` returns ``t`` and ``t.type()`` returns the
    CUDA type name (``torch.cuda.FloatTensor``)."""
    plain_type, plain_cuda = torch.Tensor.type, torch.Tensor.cuda

    def cuda_named(self, dtype=None, non_blocking=False, **kwargs):
        if dtype is None and not kwargs and self.device.type == "cpu":
            return plain_type(self).replace("torch.", "torch.cuda.", 1)
        return plain_type(self, dtype, non_blocking, **kwargs)

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        torch.Tensor.type, torch.Tensor.cuda = cuda_named, lambda t, *a, **k: t
        try:
            return fn(*args, **kwargs)
        finally:
            torch.Tensor.type, torch.Tensor.cuda = plain_type, plain_cuda

    return wrapper


def _optimizers_on_cpu():
    from megatron.core.optimizer import clip_grads, distrib_optimizer, grad_scaler
    from megatron.core.optimizer import optimizer as optimizer_mod

    for module in (optimizer_mod, distrib_optimizer, clip_grads, grad_scaler):
        module.torch = _TorchOnCpu()
    dopt = distrib_optimizer.DistributedOptimizer
    build = dopt.__dict__["_build_model_and_main_param_groups"].__func__
    dopt._build_model_and_main_param_groups = classmethod(_as_if_cuda(build))
    dopt.__init__ = _as_if_cuda(dopt.__init__)
    dopt.get_parameter_state_dp_zero = _as_if_cuda(dopt.get_parameter_state_dp_zero)
    f16 = optimizer_mod.Float16OptimizerWithFloat16Params
    f16.__init__ = _as_if_cuda(f16.__init__)
    clip = _as_if_cuda(clip_grads.clip_grad_by_total_norm_fp32)
    clip_grads.clip_grad_by_total_norm_fp32 = optimizer_mod.clip_grad_by_total_norm_fp32 = clip


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
    # Pipeline parallelism ties the first stage's embedding to the last stage's output layer with an all-reduce of
    # ``weight.data.cuda()``.
    from megatron.core.models.common.language_module.language_module import LanguageModule

    LanguageModule.setup_embeddings_and_output_layer = _as_if_cuda(LanguageModule.setup_embeddings_and_output_layer)
    _optimizers_on_cpu()

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
