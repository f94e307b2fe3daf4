"""End-to-end training throughput: based-360m (and based-1.3b) vs a same-size Megatron GPT with softmax attention.

Real training steps (forward, backward, Megatron DDP + distributed optimizer step) on synthetic tokens, bf16,
a fixed number of tokens per step at each sequence length. Reports tokens/s per GPU, model TFLOP/s, MFU and peak
memory. Correctness guard: the loss is finite and falls over the timed steps (one batch, repeated).

    python benchmarks/train_throughput.py --models based-360m gpt-360m --seq 2048 8192 32768
    torchrun --nproc_per_node 2 benchmarks/train_throughput.py --cp 2 --seq 16384 ...   # weak scaling
Prints a table and writes JSON (``--out``).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from datetime import date

import torch
import yaml

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megatron.core import parallel_state  # noqa: E402
from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig  # noqa: E402

from megatron_based.config import model_spec_from_dict  # noqa: E402
from megatron_based.flops import model_flops_per_token  # noqa: E402
from megatron_based.model import build_model  # noqa: E402
from megatron_based.parallel import initialize_parallel  # noqa: E402

from bench_utils import kernel_breakdown  # noqa: E402  (benchmarks/ is on sys.path when run as a script)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# The softmax baseline of performance.md: 24 x 1024, 16 heads, SwiGLU 2816, tied 50k vocab (~360M parameters).
BASELINES = {
    "gpt-360m": dict(layer_pattern="A" * 24, hidden_size=1024, num_attention_heads=16, ffn_hidden_size=2816),
    "gpt-1.3b": dict(layer_pattern="A" * 24, hidden_size=2048, num_attention_heads=16, ffn_hidden_size=5632),
}
PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0}  # dense bf16 datasheet peak (SXM), for MFU


def model_section(name: str) -> dict:
    if name in BASELINES:
        return dict(BASELINES[name], vocab_size=50257, make_vocab_size_divisible_by=8)
    with open(os.path.join(ROOT, "configs", f"{name}.yaml")) as fh:
        return yaml.safe_load(fh)["model"]


def build(name: str, seq: int, args, device):
    section = dict(model_section(name))
    section.pop("seq_length", None)
    spec = model_spec_from_dict(
        section, tensor_model_parallel_size=args.tp, context_parallel_size=args.cp,
        sequence_parallel=args.tp > 1, bf16=device == "cuda", params_dtype=torch.bfloat16 if device == "cuda" else
        torch.float32, pipeline_dtype=torch.bfloat16 if device == "cuda" else torch.float32,
        recompute_granularity="full" if args.recompute else None, recompute_method="uniform" if args.recompute else
        None, recompute_num_layers=1 if args.recompute else None, use_cpu_initialization=device != "cuda")
    model = build_model(spec.config, vocab_size=spec.vocab_size, max_sequence_length=seq,
                        make_vocab_size_divisible_by=spec.make_vocab_size_divisible_by)
    if device == "cuda":
        model = model.cuda()
    ddp = DistributedDataParallel(
        spec.config, DistributedDataParallelConfig(grad_reduce_in_fp32=True, use_distributed_optimizer=device == "cuda"),
        model)
    if device == "cuda":
        from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer

        opt = get_megatron_optimizer(OptimizerConfig(optimizer="adam", lr=3e-4, weight_decay=0.1, bf16=True,
                                                     use_distributed_optimizer=True, clip_grad=1.0), [ddp])
    else:  # get_megatron_optimizer hard-codes CUDA; a smoke run on CPU uses a plain AdamW.
        opt = torch.optim.AdamW(ddp.parameters(), lr=3e-4)
    return spec, ddp, opt


def run_case(name: str, seq: int, args, device) -> dict:
    cp_rank, cp = parallel_state.get_context_parallel_rank(), args.cp
    seq_global = seq * cp if args.weak else seq
    local = seq_global // cp
    micro = max(1, args.tokens_per_step // seq_global)
    spec, ddp, opt = build(name, seq_global, args, device)
    n_params = sum(p.numel() for p in ddp.parameters())
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, spec.vocab_size, (micro, seq_global + 1), generator=g)
    ids = tokens[:, cp_rank * local : (cp_rank + 1) * local].to(device)  # contiguous CP shard
    labels = tokens[:, 1 + cp_rank * local : 1 + (cp_rank + 1) * local].to(device)
    pos = torch.arange(cp_rank * local, (cp_rank + 1) * local, device=device).expand(micro, local)
    losses, times = [], []
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    def train_step():
        ddp.zero_grad_buffer()
        if hasattr(opt, "zero_grad"):
            opt.zero_grad()
        loss = ddp(ids, pos, None, labels=labels).float().mean()
        loss.backward()
        ddp.finish_grad_sync()
        if device != "cuda":  # Megatron DDP keeps gradients in .main_grad; the plain optimizer reads .grad
            for prm in ddp.parameters():
                prm.grad = prm.main_grad
        opt.step()
        return loss

    for step in range(args.warmup + args.steps):
        sync()
        t0 = time.perf_counter()
        loss = train_step()
        sync()
        if step >= args.warmup:
            times.append(time.perf_counter() - t0)
            losses.append(loss.item())
    step_s = sorted(times)[len(times) // 2]
    tok_s = micro * local / step_s  # tokens this GPU's model replica-shard processes per second
    flops_token = model_flops_per_token(spec.config, seq_global, vocab_size=spec.padded_vocab_size)
    tflops = 3 * flops_token * micro * local / args.tp / step_s / 1e12  # fwd + bwd = 3 x forward FLOPs
    gpu = torch.cuda.get_device_name() if device == "cuda" else "cpu"
    peak = next((v for k, v in PEAK_TFLOPS.items() if k in gpu), None)
    finite = all(math.isfinite(x) for x in losses)
    result = dict(model=name, seq=seq_global, local_seq=local, micro_batch=micro, tp=args.tp, cp=cp,
                  params=n_params * args.tp, step_ms=step_s * 1e3, tokens_per_s_per_gpu=tok_s / args.tp,
                  tflops_per_gpu=tflops, mfu=(tflops / peak) if peak else None,
                  peak_mem_gib=torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else None,
                  loss_first=losses[0], loss_last=losses[-1], loss_ok=finite and losses[-1] < losses[0])
    if args.profile and device == "cuda":  # where a step's GPU time goes: one more step under torch.profiler
        total, kernels = kernel_breakdown(train_step, n=1, top=25)
        result.update(profile_total_ms=total, profile_kernels_ms=kernels)
    return result


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--models", nargs="+", default=["based-360m", "gpt-360m"])
    p.add_argument("--seq", nargs="+", type=int, default=[2048, 8192, 32768])
    p.add_argument("--tokens-per-step", type=int, default=32768)
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--tp", type=int, default=1)
    p.add_argument("--cp", type=int, default=1)
    p.add_argument("--weak", action="store_true", help="with --cp: the sequence grows with the GPUs")
    p.add_argument("--recompute", action="store_true")
    p.add_argument("--profile", action="store_true", help="GPU: also record the top kernels of one step")
    p.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results", "train_throughput.json"))
    args = p.parse_args(argv)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    initialize_parallel(args.tp, 1, args.cp, seed=1234)
    rank = torch.distributed.get_rank()
    results = []
    for name in args.models:
        for seq in args.seq:
            try:
                r = run_case(name, seq, args, device)
            except torch.OutOfMemoryError:
                r = dict(model=name, seq=seq * (args.cp if args.weak else 1), tp=args.tp, cp=args.cp, oom=True)
            if device == "cuda":
                torch.cuda.empty_cache()
            results.append(r)
            if rank == 0:
                print(json.dumps(r), flush=True)
    if rank == 0:
        print("\n| model | T | tp | cp | tokens/s/GPU | TFLOP/s/GPU | MFU | peak GiB | loss first->last |")
        print("|---|---|---|---|---|---|---|---|---|")
        for r in results:
            if r.get("oom"):
                print(f"| {r['model']} | {r['seq']} | {r['tp']} | {r['cp']} | OOM | | | | |")
                continue
            mfu = f"{100 * r['mfu']:.1f}%" if r["mfu"] else "-"
            mem = f"{r['peak_mem_gib']:.1f}" if r["peak_mem_gib"] else "-"
            print(f"| {r['model']} | {r['seq']} | {r['tp']} | {r['cp']} | {r['tokens_per_s_per_gpu']:,.0f} | "
                  f"{r['tflops_per_gpu']:.1f} | {mfu} | {mem} | {r['loss_first']:.3f}->{r['loss_last']:.3f} |")
        meta = dict(date=str(date.today()), device=torch.cuda.get_device_name() if device == "cuda" else "cpu",
                    torch=torch.__version__, world_size=torch.distributed.get_world_size(), args=vars(args))
        os.makedirs(os.path.dirname(args.out), exist_ok=True)
        with open(args.out, "w") as fh:
            json.dump(dict(meta=meta, results=results), fh, indent=1)
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
