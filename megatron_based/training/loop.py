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
import sys
import time
from functools import partial

_STARTED = time.perf_counter()  # before torch, Megatron and the model code are imported

from ..runtime.noise import quiet_known_warnings, report_cuda_graph_captures
from .cli import train_parser

if __name__ == "__main__":  # python -m megatron_based.training.loop (the launchers): before torch and Megatron warn
    quiet_known_warnings("--verbose" in sys.argv)

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

from ..model.builder import build_model  # noqa: E402
from ..model.config import ConfigError  # noqa: E402
from ..model.flops import model_flops_per_token  # noqa: E402
from ..runtime.launch_env import setup_distributed_env  # noqa: E402
from ..runtime.parallel import initialize_parallel, shutdown_parallel  # noqa: E402
from . import checkpointing  # noqa: E402
from .checkpointing import CheckpointError  # noqa: E402
from .config import RunConfig, load_config  # noqa: E402
from .data import batches, build_datasets, load_tokenizer  # noqa: E402
from .deepspeed_engine import train as train_deepspeed  # noqa: E402
from .logs import TrainLogger, peak_tflops  # noqa: E402
from .optimizer import build_optimizer, fuse_torch_adam, optimizer_step  # noqa: E402
from .plan import main as plan_main  # noqa: E402
from .step import Sigterm, TrainingStopped, forward_step, global_loss  # noqa: E402


# how long importing torch, Megatron-Core and this package took (shown once, in the first run's start-up line)
_IMPORT_S = [time.perf_counter() - _STARTED]

CONFIG_ERROR_WAIT_S = 10.0  # how long ranks other than 0 wait before reporting a config error themselves


def train(cfg: RunConfig, step_hook=None) -> dict:
    """Run (or resume) training; returns a summary (steps, last loss, skipped steps, last checkpoint).

    ``step_hook(step, loss, model)``, if given, is called on every rank after each step (tests, benchmarks).
    """
    from megatron.core import parallel_state
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig, finalize_model_grads
    from megatron.core.pipeline_parallel import get_forward_backward_func

    if cfg.train.engine == "deepspeed":  # DeepSpeed ZeRO instead of Megatron DDP (launch/deepspeed.sh)
        return train_deepspeed(cfg, step_hook)
    p, t = cfg.parallel, cfg.train
    spec = cfg.model_spec()
    config = spec.config
    phases, mark = {}, time.perf_counter()  # startup time per phase, logged before the first step
    if _IMPORT_S:
        phases["imports"] = _IMPORT_S.pop()

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
    if resume is not None:  # a checkpoint of another architecture: named before the model is built
        checkpointing.check_architecture(resume, spec)
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
    if device.type == "cuda":  # graphs on or off, and why (model.cuda_graph_impl; training/config.py)
        logger.print(f"CUDA graphs: {cfg.cuda_graphs_status()}")
        if cfg.cuda_graphs()[0] == "local":  # Megatron's capture summary in our log instead of its progress bar
            report_cuda_graph_captures(logger.print)

    def evaluate(dataset=valid_ds, first_sample: int = 0, global_batches: int = eval_batches) -> float:
        model.eval()
        it = batches(dataset, first_sample, t.micro_batch_size, dp_rank, dp_size)
        total = []
        with torch.no_grad():
            for _ in range(global_batches):
                total += run(data_iterator=it, forward_only=True)
        model.train()
        return global_loss(total, device)

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

    sigterm = Sigterm()
    logger.progress.update(logger.task, completed=state["step"])
    last_loss, streak, last_saved = float("nan"), 0, None
    try:
        while state["step"] < t.train_steps:
            start = time.perf_counter()
            model.zero_grad_buffer()
            optimizer.zero_grad()
            loss = global_loss(run(data_iterator=train_iter, forward_only=False), device)
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
    if "--dry-run" in argv:  # validate against the job size and print the plan, start nothing (training/plan.py)
        return plan_main([a for a in argv if a not in ("--dry-run", "--verbose")])
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
    else:
        shutdown_parallel()  # no rank leaves before the others are done (rank 0 may host the rendezvous store)
    finally:
        if dist.is_initialized():  # an error path: no barrier (a rank that failed would leave the others waiting)
            dist.destroy_process_group()
    if int(os.environ.get("RANK", 0)) == cfg.world_size - 1:
        print(f"done: step {summary['step']}, loss {summary['loss']:.4f}, skipped {summary['skipped_steps']}, "
              f"checkpoint {summary['checkpoint']}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
