"""The optimizer: Megatron's (distributed on GPU; over gloo on CPU through ``cpu_compat``) with AdamW parameter
groups and the warmup + cosine ``OptimizerParamScheduler``, on torch's foreach gradient norm / scaling and fused
AdamW where Megatron would fall back to Python loops (no TransformerEngine or apex), and a step that skips
non-finite gradients."""
from __future__ import annotations

import math

import torch

from .checkpointing import torch_optimizers
from .config import RunConfig


def _foreach_l2_norm(chunk_size, noop_flag, tensor_lists, per_tensor, *args):
    """``amp_C.multi_tensor_l2norm``'s contract on ``torch._foreach_norm``: the total L2 norm of
    ``tensor_lists[0]`` as a 1-element fp32 tensor (and the per-tensor norms when asked), without a host sync.
    Megatron's fallback (``local_multi_tensor_l2_norm``) builds ``torch.tensor`` from the per-tensor CUDA norms,
    one host sync per parameter."""
    tensors = tensor_lists[0]
    if not tensors:
        return torch.zeros(1, dtype=torch.float32, device=noop_flag.device), None
    norms = torch.stack(torch._foreach_norm(tensors, 2.0, dtype=torch.float32))
    return torch.linalg.vector_norm(norms).reshape(1), (norms if per_tensor else None)


def _foreach_scale(chunk_size, noop_flag, tensor_lists, scale):
    """``amp_C.multi_tensor_scale``'s contract (``dst = src * scale``) on torch's foreach kernels."""
    src, dst = tensor_lists
    if all(a is b for a, b in zip(src, dst)):
        torch._foreach_mul_(dst, scale)
    else:
        torch._foreach_copy_(dst, torch._foreach_mul(src, scale))


def use_foreach_multi_tensor_ops() -> bool:
    """Where neither TransformerEngine nor apex is installed, Megatron's optimizer and gradient clipping use
    Python loops over the parameters (``megatron.core.utils.local_multi_tensor_*``); replace them, process-wide,
    with torch's foreach kernels (same results: tests/megatron_based/test_train.py). On an H100 the loops left
    the GPU idle ~10 ms per based-360m step. Returns whether anything was replaced."""
    from megatron.core import utils
    from megatron.core.optimizer import clip_grads, optimizer

    done = False
    for module, name, local, fast in ((clip_grads, "l2_norm_impl", utils.local_multi_tensor_l2_norm,
                                       _foreach_l2_norm),
                                      (clip_grads, "multi_tensor_scale_impl", utils.local_multi_tensor_scale,
                                       _foreach_scale),
                                      (optimizer, "multi_tensor_scale_impl", utils.local_multi_tensor_scale,
                                       _foreach_scale)):
        if getattr(module, name, None) is local:
            setattr(module, name, fast)
            done = True
    return done


def fuse_torch_adam(optimizer) -> int:
    """Switch every torch Adam/AdamW under ``optimizer`` (a Megatron optimizer, chained or not) to
    torch's fused single-kernel implementation. Megatron falls back to torch's AdamW (multi-tensor ``foreach``) when
    neither TransformerEngine nor apex is installed; that step was 6% of based-360m's training step on an H100.
    Same math (tests/megatron_based/test_train.py). Existing ``step`` counters move to the parameters' device, as
    the fused kernel needs (a checkpoint loaded into a non-fused optimizer keeps them on the CPU).
    Returns the number of parameter groups switched."""
    switched = 0
    for torch_opt in torch_optimizers(optimizer):
        if not isinstance(torch_opt, (torch.optim.Adam, torch.optim.AdamW)):
            continue
        for group in torch_opt.param_groups:
            if group.get("differentiable") or not group["params"]:
                continue
            group["fused"], group["foreach"] = True, False
            switched += 1
            for p in group["params"]:
                st = torch_opt.state.get(p, {})
                if torch.is_tensor(st.get("step")):
                    st["step"] = st["step"].to(device=p.device, dtype=torch.float32)
    return switched


def megatron_optimizer(opt_config, model_chunks, fast: bool = True, **kwargs):
    """Megatron's ``get_megatron_optimizer``; ``fast``: on torch's foreach gradient norm and scaling
    (``use_foreach_multi_tensor_ops``) and fused AdamW (``fuse_torch_adam``) where Megatron would fall back to its
    Python loops and foreach AdamW (no TransformerEngine or apex)."""
    from megatron.core.optimizer import get_megatron_optimizer

    if fast:
        use_foreach_multi_tensor_ops()
    optimizer = get_megatron_optimizer(opt_config, model_chunks, **kwargs)
    if fast:
        fuse_torch_adam(optimizer)
    return optimizer


def optimizer_step(optimizer) -> tuple[bool, float]:
    """Megatron's ``optimizer.step()``, unless the global gradient norm is non-finite: then no update at all
    (parameters and Adam moments keep their values). Returns (updated, gradient norm). Megatron skips only on the
    fp16 grad scaler's overflow flag; in bf16 and fp32 a NaN norm passes clipping (``nan > clip_grad`` is False) and
    with ``clip_grad=0`` is never computed, so the update writes NaN into every parameter. A finite norm also bounds
    every squared gradient, so the second moments stay finite. ``step`` computes the norm again to clip, and copies
    the gradients to the main gradients again (a copy; this is not safe for an fp16 grad scaler, which is not used)."""
    optimizer.prepare_grads()
    grad_norm = optimizer.get_grad_norm()
    if not math.isfinite(grad_norm):
        return False, grad_norm
    updated, _, _ = optimizer.step()
    return updated, grad_norm


def build_optimizer(cfg: RunConfig, model, config, torch_optimizer: bool = False):
    """AdamW with no weight decay on biases, norms (1-D) and embeddings: Megatron's optimizer (distributed when
    ``parallel.use_distributed_optimizer``) on GPUs and CPUs alike (``cpu_compat`` lets it run over gloo), so CPU
    tests run the optimizer and checkpoint code that GPU runs use. ``torch_optimizer``: a plain
    ``torch.optim.AdamW`` over the same parameter groups, for the DeepSpeed engine (which wraps it in ZeRO)."""
    from megatron.core.optimizer import OptimizerConfig, _get_param_groups
    from megatron.core.optimizer.optimizer_config import ParamKey, ParamPredicate
    from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler, ParamGroupOverride

    t = cfg.train
    opt_config = OptimizerConfig(
        optimizer="adam", lr=t.lr, min_lr=t.min_lr, weight_decay=t.weight_decay, adam_beta1=t.adam_beta1,
        adam_beta2=t.adam_beta2, adam_eps=t.adam_eps, clip_grad=t.clip_grad, bf16=config.bf16,
        params_dtype=config.params_dtype,
        use_distributed_optimizer=cfg.parallel.use_distributed_optimizer)
    no_decay = {ParamKey(name=("*.bias", "*embedding*"),
                         predicate=ParamPredicate(name="1d", fn=lambda p: p.dim() == 1)):
                ParamGroupOverride(wd_mult=0.0)}
    if torch_optimizer:
        optimizer = torch.optim.AdamW(_get_param_groups([model], opt_config, no_decay), lr=t.lr,
                                      betas=(t.adam_beta1, t.adam_beta2), eps=t.adam_eps, weight_decay=t.weight_decay)
    else:
        optimizer = megatron_optimizer(opt_config, [model], config_overrides=no_decay)
    scheduler = OptimizerParamScheduler(
        optimizer, init_lr=t.lr_warmup_init, max_lr=t.lr, min_lr=t.min_lr, lr_warmup_steps=t.lr_warmup_steps,
        lr_decay_steps=t.lr_decay_steps or t.train_steps, lr_decay_style=t.lr_decay_style,
        start_wd=t.weight_decay, end_wd=t.weight_decay, wd_incr_steps=t.train_steps, wd_incr_style="constant")
    return optimizer, scheduler
