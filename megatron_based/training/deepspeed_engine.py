"""The same BASED model trained by the DeepSpeed engine (ZeRO stage 1 or 2) instead of Megatron DDP.

Selected with ``train.engine: deepspeed`` (and ``train.zero_stage``), or ``launch/deepspeed.sh``. What stays the
same as the Megatron engine (``megatron_based.training.loop``): the model (Megatron's parallel layers, TP and CP
groups from ``parallel_state``), the data order, the AdamW parameter groups and the warmup + cosine schedule, the loss
normalised by the global token count, the logs and SIGTERM handling. What DeepSpeed does instead: gradient
reduction and ZeRO partitioning over the data x context parallel group (handed to it through :class:`MegatronMPU`),
gradient clipping, bf16 master weights, and its own checkpoints (``engine.save_checkpoint``: per-rank ZeRO shards
plus a ``latest`` file; ``--load latest`` resumes from them).

Not supported here, rejected up front by :func:`validate`: pipeline parallelism (DeepSpeed's engine drives one
model chunk; Megatron's pipeline schedules need Megatron DDP), sequence parallelism (its norms' gradients must be
all-reduced over TP, which ``finalize_model_grads`` does only for Megatron DDP) and ZeRO-3 (docs/launching.md says
why).
"""
from __future__ import annotations

import math
import time

import torch
import torch.distributed as dist

from ..model.builder import build_model
from ..model.config import ConfigError
from ..runtime.parallel import initialize_parallel
from . import checkpointing
from .config import RunConfig
from .data import batches, build_datasets, load_tokenizer
from .logs import TrainLogger
from .optimizer import build_optimizer
from .step import Sigterm, context_parallel_slice, global_loss, loss_func


class MegatronMPU:
    """Megatron's process groups in the shape DeepSpeed's ``mpu`` argument expects.

    DeepSpeed's "model parallel" group is the tensor-parallel group (its ranks hold different shards: checkpoint
    files per TP rank, grad-norm terms summed over it). Its "data parallel" group is data x context parallel:
    context-parallel ranks hold replicas of every weight and need their gradients reduced like data-parallel ones.
    No ``get_sequence_parallel_*`` methods on purpose: DeepSpeed would take them for its own Ulysses layout.
    """

    @staticmethod
    def get_model_parallel_group():
        from megatron.core import parallel_state

        return parallel_state.get_tensor_model_parallel_group()

    @staticmethod
    def get_model_parallel_rank() -> int:
        from megatron.core import parallel_state

        return parallel_state.get_tensor_model_parallel_rank()

    @staticmethod
    def get_model_parallel_world_size() -> int:
        from megatron.core import parallel_state

        return parallel_state.get_tensor_model_parallel_world_size()

    get_tensor_model_parallel_group = get_model_parallel_group
    get_tensor_model_parallel_rank = get_model_parallel_rank
    get_tensor_model_parallel_world_size = get_model_parallel_world_size

    @staticmethod
    def get_tensor_model_parallel_src_rank() -> int:
        from megatron.core import parallel_state

        return parallel_state.get_tensor_model_parallel_src_rank()

    @staticmethod
    def get_data_parallel_group():
        from megatron.core import parallel_state

        return parallel_state.get_data_parallel_group(with_context_parallel=True)

    @staticmethod
    def get_data_parallel_rank() -> int:
        from megatron.core import parallel_state

        return parallel_state.get_data_parallel_rank(with_context_parallel=True)

    @staticmethod
    def get_data_parallel_world_size() -> int:
        from megatron.core import parallel_state

        return parallel_state.get_data_parallel_world_size(with_context_parallel=True)

    @staticmethod
    def get_data_parallel_group_ranks() -> list[int]:
        return dist.get_process_group_ranks(MegatronMPU.get_data_parallel_group())


def validate(cfg: RunConfig) -> None:
    """Reject what the DeepSpeed engine cannot run, before any process group starts."""
    p, t = cfg.parallel, cfg.train
    if t.zero_stage not in (1, 2):
        raise ConfigError(f"train.zero_stage ({t.zero_stage}) must be 1 or 2 with train.engine=deepspeed (ZeRO-3 "
                          "cannot partition Megatron's tensor-parallel layers: see docs/launching.md)")
    if p.pipeline_model_parallel_size > 1:
        raise ConfigError(f"parallel.pipeline_model_parallel_size ({p.pipeline_model_parallel_size}) must be 1 with "
                          "train.engine=deepspeed; use train.engine=megatron for pipeline parallelism")
    if p.sequence_parallel:
        raise ConfigError("parallel.sequence_parallel must be false with train.engine=deepspeed (its norm gradients "
                          "are reduced by Megatron DDP only); use train.engine=megatron for sequence parallelism")


def ds_config(cfg: RunConfig) -> dict:
    """DeepSpeed's JSON config, generated from the run config (batch sizes, clipping, precision, ZeRO stage)."""
    t, mc = cfg.train, cfg.model_spec().config
    dp_cp = cfg.data_parallel_size * cfg.parallel.context_parallel_size
    return {
        # DeepSpeed counts samples over its data-parallel group, which includes the CP ranks (they see the same
        # samples): only its bookkeeping uses this; the data order is ours.
        "train_batch_size": t.micro_batch_size * cfg.num_microbatches * dp_cp,
        "train_micro_batch_size_per_gpu": t.micro_batch_size,
        "gradient_accumulation_steps": cfg.num_microbatches,
        "gradient_clipping": t.clip_grad,
        "bf16": {"enabled": bool(mc.bf16)},
        "zero_optimization": {"stage": t.zero_stage, "contiguous_gradients": True, "overlap_comm": False},
        "zero_allow_untested_optimizer": True,  # the client optimizer is torch's AdamW
        "steps_per_print": 2**31 - 1,
        "wall_clock_breakdown": False,
    }


def _skip_shm_comm_build() -> None:
    """On CPU, DeepSpeed's communication backend JIT-compiles a shared-memory all-reduce (~40 s per fresh machine)
    that only its ``inference_all_reduce`` uses. Training never calls it, so mark the op unavailable: gloo serves
    every collective. (Its compatibility table is built once and cached in ``deepspeed.ops``; edits persist.)"""
    import deepspeed.ops
    from deepspeed.accelerator import get_accelerator

    if get_accelerator().device_name() == "cpu":
        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False


def train(cfg: RunConfig, step_hook=None) -> dict:
    """Run (or resume) training with the DeepSpeed engine; same return value and ``step_hook(step, loss, model)``
    as ``loop.train``."""
    import deepspeed
    from megatron.core import parallel_state

    validate(cfg)
    p, t = cfg.parallel, cfg.train
    spec = cfg.model_spec()
    config = spec.config
    initialize_parallel(p.tensor_model_parallel_size, 1, p.context_parallel_size, seed=t.seed)
    _skip_shm_comm_build()
    deepspeed.init_distributed(dist_backend=dist.get_backend())  # adopts the process group started above
    device = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    rank, world = dist.get_rank(), dist.get_world_size()
    lock = checkpointing.lock_save_dir(t.save) if t.save else None  # held until train returns or the process ends
    dp_rank, dp_size = parallel_state.get_data_parallel_rank(), parallel_state.get_data_parallel_world_size()
    dp_cp_group = MegatronMPU.get_data_parallel_group()

    model = build_model(config, vocab_size=spec.vocab_size, max_sequence_length=spec.seq_length,
                        make_vocab_size_divisible_by=spec.make_vocab_size_divisible_by).to(device)
    # The Megatron engine's AdamW parameter groups and schedule; DeepSpeed wraps the torch optimizer (ZeRO keeps
    # the group dicts, so the scheduler's lr / weight-decay updates reach it).
    adamw, scheduler = build_optimizer(cfg, model, config, torch_optimizer=True)
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=adamw, config=ds_config(cfg),
                                           mpu=MegatronMPU, dist_init_required=False)

    state = {"step": 0, "consumed_samples": 0, "skipped_steps": 0}
    logger = TrainLogger(total_steps=t.train_steps, start_step=0, enabled=rank == world - 1,
                         tensorboard_dir=t.tensorboard_dir, show_progress=t.progress, metrics_file=t.metrics_file)
    if t.load:
        path = checkpointing.resolve(t.load, t.save)  # train.load as for the Megatron engine; None only for auto
        if path is None:
            logger.print(f"no DeepSpeed checkpoint under {t.save} yet: starting from scratch")
        else:
            path, client = engine.load_checkpoint(str(path.parent), tag=path.name)
            state.update(client["state"])
            scheduler.load_state_dict(client["scheduler"])
            checkpointing.set_rng_state(client["rng"])
            logger.print(f"resumed from {path} at step {state['step']} ({state['consumed_samples']} samples)")

    tokenizer = load_tokenizer(cfg.data.tokenizer_model)
    gbs, seq, nmb = t.global_batch_size, spec.seq_length, cfg.num_microbatches
    eval_batches = t.eval_iters if t.eval_interval else 0
    train_ds, valid_ds = build_datasets(cfg, seq, tokenizer, t.train_steps * gbs, max(eval_batches * gbs, 1))
    train_iter = batches(train_ds, state["consumed_samples"], t.micro_batch_size, dp_rank, dp_size)

    def micro_batches(it):
        return [context_parallel_slice({k: v.to(device) for k, v in next(it).items()}) for _ in range(nmb)]

    def evaluate() -> float:
        """The validation loss over ``eval_iters`` global batches, token-weighted as in training (the Megatron
        engine's evaluation: the same samples in the same order)."""
        engine.eval()
        it = batches(valid_ds, 0, t.micro_batch_size, dp_rank, dp_size)
        losses = []
        with torch.no_grad():
            for _ in range(eval_batches):
                for m in micro_batches(it):
                    output = engine(m["tokens"], m["position_ids"], attention_mask=None, labels=m["labels"])
                    losses.append(loss_func(m["loss_mask"], output)[2])
        engine.train()
        return global_loss(losses, device)

    def save():
        tag = checkpointing.checkpoint_name(state["step"])
        engine.save_checkpoint(t.save, tag=tag, client_state={
            "state": dict(state), "scheduler": scheduler.state_dict(), "rng": checkpointing.rng_state()})
        logger.print(f"saved DeepSpeed checkpoint {t.save}/{tag}")
        return tag

    sigterm = Sigterm()
    logger.progress.update(logger.task, completed=state["step"])
    last_loss, last_saved = float("nan"), None
    try:
        while state["step"] < t.train_steps:
            start = time.perf_counter()
            micro = micro_batches(train_iter)
            # Megatron's per-token loss: every token of the global batch weighs 1 / (its token count). DeepSpeed
            # divides by the accumulation steps and averages over data x context parallel ranks; undo both.
            tokens = torch.stack([m["loss_mask"].sum() for m in micro]).sum().double()
            dist.all_reduce(tokens, group=dp_cp_group)
            scale = nmb * dist.get_world_size(dp_cp_group) / tokens.item()
            losses = []
            for m in micro:
                output = engine(m["tokens"], m["position_ids"], attention_mask=None, labels=m["labels"])
                loss_sum, _, report = loss_func(m["loss_mask"], output)
                engine.backward(loss_sum * scale)
                engine.step()
                losses.append(report)
            scheduler.step(increment=1)
            loss = global_loss(losses, device)
            state["step"] += 1
            state["consumed_samples"] += gbs
            last_loss = loss
            dt = time.perf_counter() - start
            if state["step"] % t.log_interval == 0 or state["step"] == t.train_steps:
                logger.step(state["step"], {"loss": loss, "lr": adamw.param_groups[0]["lr"],
                                            "grad norm": _float(engine.get_global_grad_norm()),
                                            "tokens/s": gbs * seq / dt})
            if step_hook is not None:
                step_hook(state["step"], loss, engine.module)
            if eval_batches and state["step"] % t.eval_interval == 0:
                val = evaluate()
                logger.print(f"validation at step {state['step']}: loss {val:.4f}, perplexity {math.exp(val):.2f}")
                logger.scalars(state["step"], {"loss": val}, "valid")
            stop = sigterm.any_rank(device)
            if t.save and (stop or (t.save_interval and state["step"] % t.save_interval == 0)):
                last_saved = save()
            if stop:
                logger.print(f"SIGTERM: stopped at step {state['step']} after saving")
                break
        else:
            if t.save and last_saved != checkpointing.checkpoint_name(state["step"]):
                last_saved = save()
    finally:
        sigterm.restore()
        logger.close()
        if lock is not None:
            lock.close()
    return {"step": state["step"], "loss": last_loss, "skipped_steps": state["skipped_steps"],
            "checkpoint": f"{t.save}/{last_saved}" if last_saved else None}


def _float(x) -> float | None:
    return None if x is None else float(x)

