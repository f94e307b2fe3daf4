"""``--dry-run``: check a run config against the job's size and print the resolved plan, starting no processes.

    python -m megatron_based.training.plan configs/tiny.yaml train.micro_batch_size=2 --nnodes 2 --nproc-per-node 8

Every launcher in ``launch/`` runs this before it allocates anything. It checks what would otherwise fail minutes
into a job (or silently waste it): the world size against TP x CP x PP (x DP), heads, channels and sequence against
the parallel sizes, the batch arithmetic, and an estimate of the memory each GPU needs (parameters, gradients,
optimizer state and activations) against ``--gpu-memory-gib``. Each rejection names the sizes to change.
"""
from __future__ import annotations

import argparse
import contextlib
import sys
from dataclasses import dataclass

if __name__ == "__main__":  # the launchers' dry run: hide the known third-party warnings of the imports below
    from ..runtime.noise import quiet_known_warnings

    quiet_known_warnings("--verbose" in sys.argv)

from ..model.config import ConfigError, padded_vocab_size, planning_for
from ..model.mixers.registry import get_mixer
from .config import RunConfig, load_config
from .deepspeed_engine import validate

GIB = 2**30


@dataclass
class Plan:
    cfg: RunConfig
    nnodes: int
    gpus_per_node: int
    total_params: int
    params_per_gpu: int  # the largest pipeline stage's share on one TP rank
    memory: dict  # bytes per GPU: parameters, gradients, optimizer, activations, total
    notes: list


def _layer_params(cfg, mixer: str, tp: int) -> tuple[int, int]:
    """(parameters split across TP, parameters replicated on every TP rank) of one layer (based-spec.md)."""
    d, ffn = cfg.hidden_size, cfg.ffn_hidden_size
    split, replicated = d * 2 * ffn + ffn * d, 2 * d  # SwiGLU fc1/fc2; the two RMSNorms
    mixer_split, mixer_replicated = get_mixer(mixer).parameter_count(cfg)  # the mixer's own count (its folder)
    return split + mixer_split, replicated + mixer_replicated


def _stage_patterns(pattern: str, pp: int) -> list[str]:
    per = len(pattern) // pp
    return [pattern[i * per:(i + 1) * per] for i in range(pp)]


def _activation_bytes_per_layer(cfg, mixer: str, tokens: int, elem: int, recompute: str | None) -> int:
    """Saved activations of one layer for one micro-batch of ``tokens`` (CP-local) tokens on one TP rank.

    Counted in units of [tokens, width] tensors that backward keeps: the residual-stream tensors (norm inputs and
    outputs; divided by TP only with sequence parallel), the mixer's projections and the SwiGLU intermediates.
    Full recompute keeps only the layer input. An estimate: kernels may keep a little more (fp32 denominators).
    """
    tp = cfg.tensor_model_parallel_size
    d, ffn = cfg.hidden_size, cfg.ffn_hidden_size
    stream = 4 * d / (tp if cfg.sequence_parallel else 1)
    if recompute == "full":
        return int(tokens * elem * d / (tp if cfg.sequence_parallel else 1))
    mixer_width = get_mixer(mixer).activation_width(cfg)
    mlp_width = 0 if recompute == "selective" else 3 * ffn
    return int(tokens * elem * (stream + (mixer_width + mlp_width) / tp))


def _optimizer_bytes_per_param(bf16: bool, engine: str, zero_stage: int, distributed_optimizer: bool,
                               dp: int) -> tuple[float, float, float]:
    """(parameter, gradient, optimizer-state) bytes per parameter on one GPU.

    bf16: bf16 weights, fp32 gradients and an fp32 master copy + two Adam moments (12 bytes); fp32: fp32 weights
    and gradients and two moments (8 bytes). Megatron's distributed optimizer and ZeRO-1 shard the optimizer state
    over the data-parallel ranks, ZeRO-2 the gradients too, ZeRO-3 the weights as well.
    """
    weight, grad, state = (2.0, 4.0, 12.0) if bf16 else (4.0, 4.0, 8.0)
    shard = zero_stage if engine == "deepspeed" else (1 if distributed_optimizer else 0)
    if shard >= 1:
        state /= dp
    if shard >= 2:
        grad /= dp
    if shard >= 3:
        weight /= dp
    return weight, grad, state


def make_plan(cfg: RunConfig, *, gpus_per_node: int | None = None, gpu_memory_gib: float | None = None) -> Plan:
    """Validate ``cfg`` (already checked against its world size by ``load_config``) for this job layout."""
    spec = cfg.model_spec()
    mc, p, t = spec.config, cfg.parallel, cfg.train
    tp, cp, pp, dp = (p.tensor_model_parallel_size, p.context_parallel_size, p.pipeline_model_parallel_size,
                      cfg.data_parallel_size)
    world = cfg.world_size
    gpus_per_node = gpus_per_node or world
    notes = []
    if world % gpus_per_node:
        raise ConfigError(f"world size ({world}) must be a whole number of nodes of {gpus_per_node} GPUs "
                          f"(--nproc-per-node)")
    nnodes = world // gpus_per_node
    if t.engine == "deepspeed":
        validate(cfg)
    seq = spec.seq_length
    if seq % cp:
        raise ConfigError(f"model.seq_length ({seq}) must be divisible by parallel.context_parallel_size ({cp})")
    local_seq = seq // cp
    if p.sequence_parallel and local_seq % tp:
        raise ConfigError(f"with sequence_parallel, the per-CP-rank sequence model.seq_length / "
                          f"context_parallel_size ({seq} / {cp} = {local_seq}) must be divisible by "
                          f"parallel.tensor_model_parallel_size ({tp})")
    if tp * cp > gpus_per_node:
        notes.append(f"TP x CP ({tp} x {cp}) spans more than one node of {gpus_per_node} GPUs: its collectives "
                     "run over the inter-node network (slow); keep tp * cp <= GPUs per node")
    nmb = cfg.num_microbatches
    if pp > 1 and nmb < pp:
        notes.append(f"{nmb} micro-batches per step for {pp} pipeline stages: most of each step is pipeline bubble; "
                     f"raise train.global_batch_size or lower train.micro_batch_size")

    # Parameters: the largest stage's share on one TP rank (replicated over CP and DP).
    vocab = padded_vocab_size(spec.vocab_size, spec.make_vocab_size_divisible_by, tp)
    stages = _stage_patterns(mc.layer_pattern, pp)
    total = vocab * mc.hidden_size + mc.hidden_size
    per_stage = []
    for i, pattern in enumerate(stages):
        n = 0
        for mixer in pattern:
            split, replicated = _layer_params(mc, mixer, tp)
            total += split + replicated
            n += split // tp + replicated
        if i == 0 or i == pp - 1:  # word embeddings on the first stage, the tied head's copy on the last one
            n += vocab * mc.hidden_size // tp
        n += mc.hidden_size if i == pp - 1 else 0
        per_stage.append(n)
    params = max(per_stage)

    bf16 = mc.bf16
    elem = 2 if bf16 else 4
    w, g, s = _optimizer_bytes_per_param(bf16, t.engine, t.zero_stage, p.use_distributed_optimizer and bf16, dp * cp)
    tokens = t.micro_batch_size * local_seq
    in_flight = min(pp, nmb)  # 1F1B: the first stage holds this many micro-batches' activations
    activations = in_flight * sum(_activation_bytes_per_layer(mc, m, tokens, elem, t.recompute_granularity)
                                  for m in stages[0])
    if t.recompute_granularity == "full":  # one layer is rebuilt in full during its backward
        activations += max(_activation_bytes_per_layer(mc, m, tokens, elem, None) for m in stages[0])
    activations += 2 * tokens * (vocab // tp) * 4  # fp32 logits and their gradient on the last stage
    memory = {"parameters": params * w, "gradients": params * g, "optimizer": params * s,
              "activations": activations}
    memory["total"] = sum(memory.values())
    if gpu_memory_gib and memory["total"] > gpu_memory_gib * GIB:
        raise ConfigError(
            f"estimated memory per GPU ({memory['total'] / GIB:.1f} GiB: parameters {memory['parameters'] / GIB:.1f}, "
            f"gradients {memory['gradients'] / GIB:.1f}, optimizer {memory['optimizer'] / GIB:.1f}, activations "
            f"{memory['activations'] / GIB:.1f}) exceeds the GPU's {gpu_memory_gib:g} GiB: lower "
            f"train.micro_batch_size ({t.micro_batch_size}), set train.recompute_granularity=full, or raise "
            f"tensor/pipeline parallel sizes (now {tp}/{pp})")
    return Plan(cfg=cfg, nnodes=nnodes, gpus_per_node=gpus_per_node, total_params=total, params_per_gpu=params, memory=memory, notes=notes)


def render(plan: Plan) -> None:
    from rich.console import Console
    from rich.table import Table

    cfg, mc = plan.cfg, plan.cfg.model_spec()
    p, t = cfg.parallel, cfg.train
    table = Table(title="launch plan (dry run: no process started)", show_header=False)
    engine = t.engine + (f" (ZeRO-{t.zero_stage})" if t.engine == "deepspeed" else " (DDP)")
    rows = [
        ("processes", f"{cfg.world_size} = {plan.nnodes} node(s) x {plan.gpus_per_node}"),
        ("layout", f"TP {p.tensor_model_parallel_size} x CP {p.context_parallel_size} x "
                   f"PP {p.pipeline_model_parallel_size} x DP {cfg.data_parallel_size}"
                   + (" + sequence parallel" if p.sequence_parallel else "")),
        ("engine", engine),
        ("model", f"{mc.config.layer_pattern} ({mc.config.num_layers} layers, hidden {mc.config.hidden_size}), "
                  f"{plan.total_params:,} parameters"),
        ("batch", f"global {t.global_batch_size} = micro {t.micro_batch_size} x DP {cfg.data_parallel_size} x "
                  f"{cfg.num_microbatches} micro-batches; {t.global_batch_size * mc.seq_length:,} tokens/step"),
        ("precision", "bf16" if mc.config.bf16 else "fp32"),
        ("CUDA graphs", cfg.cuda_graphs_status()),
        ("parameters per GPU", f"{plan.params_per_gpu:,}"),
    ]
    rows += [(f"memory: {k}", f"{v / GIB:.2f} GiB") for k, v in plan.memory.items()]
    for row in rows:
        table.add_row(*row)
    console = Console()
    console.print(table)
    for note in plan.notes:
        console.print(f"[yellow]note:[/yellow] {note}")


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m megatron_based.training.plan", description=__doc__.split("\n\n")[0])
    ap.add_argument("config", help="run config YAML (configs/*.yaml)")
    ap.add_argument("overrides", nargs="*", help="section.key=value overrides, as for megatron-based-train")
    ap.add_argument("--nnodes", type=int, default=1)
    ap.add_argument("--verbose", action="store_true", help="show the third-party warnings hidden by default")
    ap.add_argument("--nproc-per-node", type=int, default=1, help="processes (GPUs) per node")
    ap.add_argument("--load", help="as for megatron-based-train (= train.load)")
    ap.add_argument("--save", help="as for megatron-based-train (= train.save)")
    ap.add_argument("--gpu-memory-gib", type=float, default=None,
                    help="reject plans whose memory estimate exceeds this (default: this machine's GPU, if any)")
    ap.add_argument("--gpu", action="store_true",
                    help="plan for GPU nodes from a machine without GPUs (a login node; launch/submit.sh passes it): "
                         "train.precision auto means bf16 and GPU-only settings are accepted")
    return ap


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_intermixed_args(argv)
    if args.nnodes < 1 or args.nproc_per_node < 1:
        print(f"invalid launch plan: --nnodes ({args.nnodes}) and --nproc-per-node ({args.nproc_per_node}) must "
              "be >= 1", file=sys.stderr)
        return 2
    memory = args.gpu_memory_gib
    if memory is None:
        import torch

        if torch.cuda.is_available():
            memory = torch.cuda.get_device_properties(0).total_memory / GIB
    with planning_for(gpu=True) if args.gpu else contextlib.nullcontext():
        try:
            overrides = list(args.overrides) + [f"train.{k}={v}" for k in ("load", "save") if (v := getattr(args, k))]
            cfg = load_config(args.config, overrides, world_size=args.nnodes * args.nproc_per_node)
            plan = make_plan(cfg, gpus_per_node=args.nproc_per_node, gpu_memory_gib=memory)
        except ConfigError as err:
            print(f"invalid launch plan: {err}", file=sys.stderr)
            return 2
        if args.gpu and memory is None:
            plan.notes.append("GPU memory not checked (no GPU here): pass --gpu-memory-gib, e.g. 80")
        render(plan)
    return 0


if __name__ == "__main__":
    sys.exit(main())
