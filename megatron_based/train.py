"""Pretraining entry point: ``megatron-based-train CONFIG.yaml [section.key=value ...]``.

Megatron-Core does the heavy lifting: ``GPTModel`` with the BASED block spec, ``DistributedDataParallel``
(gradients reduced over data x context parallel ranks), Megatron's optimizer (distributed, on GPU) or torch AdamW
(on CPU, where ``get_megatron_optimizer`` needs CUDA) with the same parameter groups, ``OptimizerParamScheduler``
(warmup + cosine), the pipeline schedules of ``get_forward_backward_func`` (micro-batches, gradient accumulation),
``GPTDataset`` and ``dist_checkpointing``. Launch several processes with torchrun; see docs/training.md.
"""
from __future__ import annotations

import math
import os
import signal
import sys
import time
from functools import partial

from .cli import quiet_known_warnings, train_parser

if __name__ == "__main__":  # python -m megatron_based.train (the launchers): before torch and Megatron warn on import
    quiet_known_warnings("--verbose" in sys.argv)

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

from .checkpointing import CheckpointError, torch_optimizers  # noqa: E402
from .config import ConfigError  # noqa: E402
from .training_config import RunConfig, load_config  # noqa: E402


CONFIG_ERROR_WAIT_S = 10.0  # how long ranks other than 0 wait before reporting a config error themselves


class TrainingStopped(RuntimeError):
    """Training stopped on purpose (too many non-finite steps, non-finite parameters); the last good checkpoint is
    kept."""


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


def context_parallel_slice(batch: dict) -> dict:
    """The CP hook: CP rank r keeps tokens [r L, (r+1) L) with their global position ids (contiguous sharding,
    docs/parallelism.md; never Megatron's zig-zag). The BASED mixers pass states and halos between ranks; the loss
    is normalised by the global token count through ``calculate_per_token_loss``."""
    from megatron.core import parallel_state

    if parallel_state.get_context_parallel_world_size() == 1:
        return batch
    from .context_parallel import shard_batch_for_cp

    return shard_batch_for_cp(batch)


def loss_func(loss_mask: torch.Tensor, output_tensor: torch.Tensor):
    """Per-token loss summed over the micro-batch, with its token count: Megatron normalises by the global count
    (``calculate_per_token_loss``), so every token weighs the same whatever the micro-batch / DP / CP split."""
    mask = loss_mask.reshape(-1).float()
    loss_sum = (output_tensor.float().reshape(-1) * mask).sum()
    n = mask.sum().to(torch.int)
    return loss_sum, n, {"lm loss": torch.stack([loss_sum.detach(), mask.sum().detach()])}


def forward_step(data_iterator, model):
    batch = next(data_iterator)
    if torch.cuda.is_available():
        batch = {k: v.cuda(non_blocking=True) for k, v in batch.items()}
    batch = context_parallel_slice(batch)
    output = model(batch["tokens"], batch["position_ids"], attention_mask=None, labels=batch["labels"])
    return output, partial(loss_func, batch["loss_mask"])


def _global_loss(losses: list[dict], device) -> float:
    """Token-weighted loss over the global batch, identical on every rank (so all ranks agree to skip a step)."""
    from megatron.core import parallel_state

    total = torch.zeros(2, dtype=torch.float64, device=device)
    for item in losses:
        total += item["lm loss"].to(total)
    dist.all_reduce(total, group=parallel_state.get_data_parallel_group(with_context_parallel=True))
    dist.broadcast(total, src=parallel_state.get_pipeline_model_parallel_last_rank(),
                   group=parallel_state.get_pipeline_model_parallel_group())
    return float(total[0] / total[1])


class _Sigterm:
    """Remembers a SIGTERM (slurm preemption, ``timeout``, torchrun stopping); the loop checkpoints and exits at the
    end of the step. slurm and ``timeout`` send it to every process of the job, torchrun to each worker's process
    group: the save must start no helper process such a signal would kill
    (``checkpointing._write_results_in_process``), and a repeated SIGTERM changes nothing. torchrun and slurm send
    SIGKILL 30 s later (their defaults)."""

    def __init__(self):
        self.received = False
        self.previous = signal.signal(signal.SIGTERM, self._handle)

    def _handle(self, signum, frame):
        self.received = True

    def any_rank(self, device) -> bool:
        flag = torch.tensor([float(self.received)], device=device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())

    def restore(self):
        signal.signal(signal.SIGTERM, self.previous)


def train(cfg: RunConfig, step_hook=None) -> dict:
    """Run (or resume) training; returns a summary (steps, last loss, skipped steps, last checkpoint).

    ``step_hook(step, loss, model)``, if given, is called on every rank after each step (tests, benchmarks).
    """
    from megatron.core import parallel_state
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig, finalize_model_grads
    from megatron.core.pipeline_parallel import get_forward_backward_func

    from . import checkpointing
    from .data import batches, build_datasets, load_tokenizer
    from .flops import model_flops_per_token
    from .logging_utils import TrainLogger, peak_tflops
    from .model import build_model
    from .parallel import initialize_parallel

    if cfg.train.engine == "deepspeed":  # DeepSpeed ZeRO instead of Megatron DDP (launch/deepspeed.sh)
        from .deepspeed_engine import train as train_deepspeed

        return train_deepspeed(cfg, step_hook)
    p, t = cfg.parallel, cfg.train
    spec = cfg.model_spec()
    config = spec.config
    phases, mark = {}, time.perf_counter()  # startup time per phase, logged before the first step

    def phase(name: str) -> None:
        nonlocal mark
        now = time.perf_counter()
        phases[name] = now - mark
        mark = now

    initialize_parallel(p.tensor_model_parallel_size, p.pipeline_model_parallel_size, p.context_parallel_size,
                        seed=t.seed, cuda_graphs=config.cuda_graph_impl == "local")
    device = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    rank, world = dist.get_rank(), dist.get_world_size()
    lock = checkpointing.lock_save_dir(t.save) if t.save else None  # held until train returns or the process ends
    resume = checkpointing.resolve(t.load, t.save) if t.load else None  # None for train.load=auto on a fresh save
    dp_rank = parallel_state.get_data_parallel_rank()
    dp_size = parallel_state.get_data_parallel_world_size()

    model = build_model(config, vocab_size=spec.vocab_size, max_sequence_length=spec.seq_length,
                        make_vocab_size_divisible_by=spec.make_vocab_size_divisible_by).to(device)
    ddp_config = DistributedDataParallelConfig(grad_reduce_in_fp32=True,
                                               use_distributed_optimizer=p.use_distributed_optimizer)
    model = DistributedDataParallel(config, ddp_config, model)
    config.no_sync_func = model.no_sync
    config.finalize_model_grads_func = finalize_model_grads
    optimizer, scheduler = build_optimizer(cfg, model, config)
    phase("process groups, model and optimizer")

    state = {"step": 0, "consumed_samples": 0, "skipped_steps": 0}
    logger = TrainLogger(total_steps=t.train_steps, start_step=0, enabled=rank == world - 1,
                         tensorboard_dir=t.tensorboard_dir, show_progress=t.progress, metrics_file=t.metrics_file)
    if t.load:
        if resume is None:
            logger.print(f"no checkpoint under {t.save} yet: starting from scratch")
        else:
            state.update(checkpointing.load_checkpoint(resume, model, optimizer, scheduler))
            fuse_torch_adam(optimizer)  # loading restores the saved param-group options
            logger.print(f"resumed from {resume} at step {state['step']} ({state['consumed_samples']} samples)")
        phase("checkpoint load")

    tokenizer = load_tokenizer(cfg.data.tokenizer_model)
    gbs, seq = t.global_batch_size, spec.seq_length
    eval_batches = t.eval_iters if t.eval_interval else 0
    train_ds, valid_ds = build_datasets(cfg, seq, tokenizer, t.train_steps * gbs, max(eval_batches * gbs, 1))
    train_iter = batches(train_ds, state["consumed_samples"], t.micro_batch_size, dp_rank, dp_size)
    forward_backward = get_forward_backward_func()
    run = partial(forward_backward, forward_step_func=forward_step, model=[model],
                  num_microbatches=cfg.num_microbatches, seq_length=seq,  # the schedule divides by CP itself
                  micro_batch_size=t.micro_batch_size)
    flops_per_token = 3 * model_flops_per_token(config, seq, spec.padded_vocab_size)  # forward + backward
    peak = peak_tflops(t.peak_tflops)
    run_config = cfg.to_dict()
    phase("data")
    logger.print(f"ready to train after {sum(phases.values()):.1f} s ("
                 + ", ".join(f"{name} {dt:.1f} s" for name, dt in phases.items()) + ")")

    def evaluate(dataset=valid_ds, first_sample: int = 0, global_batches: int = eval_batches) -> float:
        model.eval()
        it = batches(dataset, first_sample, t.micro_batch_size, dp_rank, dp_size)
        total = []
        with torch.no_grad():
            for _ in range(global_batches):
                total += run(data_iterator=it, forward_only=True)
        model.train()
        return _global_loss(total, device)

    def save():
        """Checkpoint the current state if it is good; returns the checkpoint, or None. Non-finite parameters stop
        the run (no later step can repair them). Finite parameters whose loss on the next global batch is non-finite
        (a blow-up: the next step would only be skipped) are not saved; the run goes on. So every checkpoint is one a
        run can resume from, and ``last_saved`` is always the last good one."""
        finite = torch.stack([torch.isfinite(p).all() for p in model.parameters()]).all().float().reshape(1)
        dist.all_reduce(finite, op=dist.ReduceOp.MIN)
        if not finite.item():
            raise TrainingStopped(f"the parameters after step {state['step']} are non-finite, so they were not saved; "
                                  f"the last good checkpoint is {last_saved or 'none'}")
        next_loss = evaluate(train_ds, state["consumed_samples"], 1)
        if not math.isfinite(next_loss):
            logger.print(f"step {state['step']} not saved: its parameters give a non-finite loss ({next_loss}) on "
                         "the next batch")
            return None
        start = time.perf_counter()
        path = checkpointing.save_checkpoint(t.save, state["step"], model, optimizer, scheduler, state, run_config,
                                             optimizer_format=t.optimizer_checkpoint_format)
        logger.print(f"saved checkpoint {path} in {time.perf_counter() - start:.1f} s")
        return path

    sigterm = _Sigterm()
    logger.progress.update(logger.task, completed=state["step"])
    last_loss, streak, last_saved = float("nan"), 0, None
    try:
        while state["step"] < t.train_steps:
            start = time.perf_counter()
            model.zero_grad_buffer()
            optimizer.zero_grad()
            loss = _global_loss(run(data_iterator=train_iter, forward_only=False), device)
            state["step"] += 1
            state["consumed_samples"] += gbs
            grad_norm = None
            if math.isfinite(loss):
                ok, grad_norm = optimizer_step(optimizer)
            else:
                ok = False
            if ok:
                scheduler.step(increment=1)
                streak, last_loss = 0, loss
            else:
                state["skipped_steps"] += 1
                streak += 1
                logger.print(f"step {state['step']}: non-finite loss {loss} / grad norm {grad_norm}: step skipped "
                             f"({streak} in a row, {state['skipped_steps']} in all)")
                if streak >= t.max_nonfinite_steps:
                    raise TrainingStopped(
                        f"{streak} non-finite steps in a row (train.max_nonfinite_steps={t.max_nonfinite_steps}): "
                        f"stopping; the last good checkpoint is {last_saved or 'none'}")
            dt = time.perf_counter() - start
            if state["step"] % t.log_interval == 0 or state["step"] == t.train_steps:
                tokens_per_s = gbs * seq / dt
                tflops = flops_per_token * tokens_per_s / world / 1e12
                logger.step(state["step"], {"loss": loss, "lr": optimizer.param_groups[0]["lr"],
                                            "grad norm": grad_norm, "tokens/s": tokens_per_s, "TFLOP/s": tflops,
                                            "MFU": tflops / peak if peak else None})
            if step_hook is not None:
                step_hook(state["step"], loss, model)
            if eval_batches and state["step"] % t.eval_interval == 0:
                val = evaluate()
                logger.print(f"validation at step {state['step']}: loss {val:.4f}, perplexity {math.exp(val):.2f}")
                logger.scalars(state["step"], {"loss": val}, "valid")
            stop = sigterm.any_rank(device)
            if t.save and streak == 0 and (stop or (t.save_interval and state["step"] % t.save_interval == 0)):
                last_saved = save() or last_saved
            if stop:
                saved = last_saved is not None and last_saved.name == checkpointing.checkpoint_name(state["step"])
                logger.print(f"SIGTERM: stopped at step {state['step']} " + ("after saving" if saved else
                             f"without saving it; the last good checkpoint is {last_saved or 'none'}"))
                break
        else:  # finished without SIGTERM: make sure the final step is saved
            if t.save and streak == 0 and (last_saved is None
                                           or last_saved.name != checkpointing.checkpoint_name(state["step"])):
                if (path := save()) is None:
                    raise TrainingStopped(f"the parameters after the last step ({state['step']}) were not saved; the "
                                          f"last good checkpoint is {last_saved or 'none'}")
                last_saved = path
    finally:
        sigterm.restore()
        logger.close()
        if lock is not None:
            lock.close()
    return {"step": state["step"], "loss": last_loss, "skipped_steps": state["skipped_steps"],
            "checkpoint": str(last_saved) if last_saved else None}


def parse_args(argv):
    return train_parser().parse_intermixed_args(argv)  # overrides may come after --load / --save


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    quiet_known_warnings("--verbose" in argv)
    if "--dry-run" in argv:  # validate against the job size and print the plan, start nothing (megatron_based/plan.py)
        from .plan import main as plan_main

        return plan_main([a for a in argv if a not in ("--dry-run", "--verbose")])
    from .launch_env import setup_distributed_env

    env = setup_distributed_env()  # rank / world size / master from torchrun, slurm or MPI before the config check
    args = parse_args(argv)
    overrides = list(args.overrides)
    overrides += [f"train.load={args.load}"] if args.load else []
    overrides += [f"train.save={args.save}"] if args.save else []
    try:
        cfg = load_config(args.config, overrides)  # every check before any process group starts
    except ConfigError as e:
        # Every rank runs the same checks on the same files, so all fail them alike and rank 0 alone says why. The
        # others wait first: torchrun stops every worker as soon as one exits, and rank 0 must have printed by then
        # (and is named as the root cause). A rank still running after the wait (its files differ from rank 0's)
        # says why too. torchrun prints its own summary below the line (docs/training.md).
        if env.rank != 0:
            time.sleep(CONFIG_ERROR_WAIT_S)
        print(f"config error{f' (rank {env.rank})' if env.rank else ''}: {e}", file=sys.stderr, flush=True)
        return 2
    try:
        summary = train(cfg)
    except TrainingStopped as e:
        print(f"training stopped: {e}", file=sys.stderr)
        return 3
    except CheckpointError as e:
        print(f"checkpoint error: {e}", file=sys.stderr)
        return 2
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    if int(os.environ.get("RANK", 0)) == cfg.world_size - 1:
        print(f"done: step {summary['step']}, loss {summary['loss']:.4f}, skipped {summary['skipped_steps']}, "
              f"checkpoint {summary['checkpoint']}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
