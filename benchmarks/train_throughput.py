"""End-to-end training throughput: based-360m (and based-1.3b) vs a same-size Megatron GPT with softmax attention.

Real training steps (forward, backward, Megatron DDP + distributed optimizer step) on synthetic tokens, bf16,
a fixed number of tokens per GPU and step at each sequence length. Reports tokens/s per GPU, model TFLOP/s, MFU
and peak memory; with --profile also where a step's GPU time goes, per layer type and per kernel. Correctness
guard: the loss is finite and falls over the timed steps (one batch, repeated; Adam's learning rate rises linearly
over the untimed warm-up steps: without that warm-up BASED's loss oscillated on an H100 while it memorized the batch
much faster than the GPT, on both the Triton and the PyTorch path, so the guard flagged the optimizer, not the model).

    python benchmarks/train_throughput.py --models based-360m gpt-360m --seq 2048 8192 32768 --profile
    torchrun --nproc_per_node 2 benchmarks/train_throughput.py --cp 2 --weak --seq 16384 ...   # weak scaling
    python benchmarks/train_throughput.py --smoke          # tiny models on CPU, a few steps (tests, no GPU)
Prints a table and writes JSON (``--out``; ``--append`` adds to an existing file). Plot and tables:
benchmarks/plot_throughput.py.
"""
from __future__ import annotations

import argparse
import bisect
import contextlib
import json
import math
import os
import time
from collections import defaultdict
from datetime import date

from megatron_based.runtime.noise import quiet_known_warnings, report_cuda_graph_captures

if __name__ == "__main__":  # run as a script (not imported by the tests), before Megatron is imported
    quiet_known_warnings()  # the entry points' filter: Megatron's known notices stay out of the benchmark's output
import torch  # noqa: E402
from torch.autograd.profiler import record_function  # noqa: E402
from megatron.core import parallel_state  # noqa: E402
from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig  # noqa: E402

from megatron_based.model.config import model_spec_from_dict, read_model_section
from megatron_based.model.flops import model_flops_per_token
from megatron_based.model import build_model
from megatron_based.runtime.parallel import initialize_parallel
from megatron_based.training.optimizer import megatron_optimizer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# The softmax baselines of performance.md: the BASED model's width, depth 24, SwiGLU, tied 50k vocab.
BASELINES = {
    "gpt-360m": dict(layer_pattern="A" * 24, hidden_size=1024, num_attention_heads=16, ffn_hidden_size=2816,
                     vocab_size=50257, make_vocab_size_divisible_by=8),
    "gpt-1.3b": dict(layer_pattern="A" * 24, hidden_size=2048, num_attention_heads=16, ffn_hidden_size=5632,
                     vocab_size=50257, make_vocab_size_divisible_by=8),
    "gpt-tiny": dict(layer_pattern="AAAA", hidden_size=128, num_attention_heads=4, vocab_size=1024,
                     make_vocab_size_divisible_by=8),  # the size of configs/tiny.yaml, for --smoke
}
PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0}  # dense bf16 datasheet peak (SXM), for MFU
SMOKE = dict(models=["tiny", "gpt-tiny"], seq=[64, 128], tokens_per_step=256, steps=3, warmup=1, profile=True)
DEFAULTS = dict(models=["based-360m", "gpt-360m"], seq=[2048, 8192, 32768], tokens_per_step=32768, steps=5,
                warmup=3, profile=False)


def model_section(name: str) -> dict:
    if name in BASELINES:
        return dict(BASELINES[name])
    path = os.path.join(ROOT, "configs", f"{name}.yaml")
    if not os.path.exists(path):
        raise SystemExit(f"unknown model {name!r}: not a baseline ({', '.join(BASELINES)}) nor configs/{name}.yaml")
    return read_model_section(path)


def build(name: str, seq: int, args, device, recompute: bool):
    section = dict(model_section(name))
    section.pop("seq_length", None)
    if args.cross_entropy:
        section["cross_entropy_fusion_impl"] = args.cross_entropy
    section["rope_fusion"] = args.rope_fusion
    cuda = device == "cuda"
    spec = model_spec_from_dict(
        section, tensor_model_parallel_size=args.tp, context_parallel_size=args.cp, sequence_parallel=args.tp > 1,
        bf16=cuda, params_dtype=torch.bfloat16 if cuda else torch.float32,
        pipeline_dtype=torch.bfloat16 if cuda else torch.float32,
        recompute_granularity="full" if recompute else None, recompute_method="uniform" if recompute else None,
        recompute_num_layers=1 if recompute else None, use_cpu_initialization=not cuda,
        cuda_graph_impl="local" if args.cuda_graphs else "none")
    model = build_model(spec.config, vocab_size=spec.vocab_size, max_sequence_length=seq,
                        make_vocab_size_divisible_by=spec.make_vocab_size_divisible_by)
    if cuda:
        model = model.cuda()
    ddp = DistributedDataParallel(
        spec.config, DistributedDataParallelConfig(grad_reduce_in_fp32=True, use_distributed_optimizer=cuda), model)
    if cuda:
        from megatron.core.optimizer import OptimizerConfig

        # --no-fused-adam keeps Megatron's fallbacks as they are
        opt = megatron_optimizer(OptimizerConfig(optimizer="adam", lr=args.lr, weight_decay=0.1, bf16=True,
                                                 use_distributed_optimizer=True, clip_grad=1.0), [ddp],
                                 fast=args.fused_adam)
    else:  # get_megatron_optimizer hard-codes CUDA; a smoke run on CPU uses a plain AdamW.
        opt = torch.optim.AdamW(ddp.parameters(), lr=args.lr)
    return spec, ddp, opt


# ---------------------------------------------------------------------------------------------------------------
# Per-layer-type profile. Forward: a profiler range "e2e::<label>" around every labelled module (hooks), so the
# ops (and the kernels they launch) nest under it. Backward: each autograd node carries the sequence number of
# the forward op that created it, and the profiler records it both on the forward op and on the backward
# "evaluate_function" event, so a backward kernel gets the label of the forward range its node was created in.
# Step-level ranges (zero-grad, grad-sync, optimizer) are always on (a few microseconds each).
RANGE = "e2e::"
BACKWARD = "autograd::engine::evaluate_function: "
COMM = ("nccl", "c10d::", "gloo")  # collective kernels (GPU) or ops (CPU smoke runs): labelled comm/<where>
STEP_LABELS = ("zero-grad", "grad-sync", "optimizer")  # ranges of train_step, outside forward and backward


def layer_labels(model, pattern: str) -> dict:
    """module -> label: the mixer's pattern letter (L, S, C, A), MLP, norm, embedding, head+loss, and residual for
    a layer's own work outside its submodules (bias-dropout-add); "graphed layers" for CUDA-graphed layers."""
    labels = {model.embedding: "embedding", model.output_layer: "head+loss", model.decoder.final_layernorm: "norm"}
    if any(getattr(layer, "cudagraph_manager", None) is not None for layer in model.decoder.layers):
        # CUDA-graphed layers replay whole graphs (and Megatron refuses hooks on them): one range around them all
        labels[model.decoder] = "graphed layers"
        return {m: v for m, v in labels.items() if m is not None}
    for layer in model.decoder.layers:
        labels[layer] = "residual"
        labels[layer.self_attention] = pattern[layer.layer_number - 1]
        labels[layer.input_layernorm] = labels[layer.pre_mlp_layernorm] = "norm"
        labels[layer.mlp] = "MLP"
    return {m: v for m, v in labels.items() if m is not None}


@contextlib.contextmanager
def layer_ranges(model, pattern: str):
    """Forward profiler ranges around the labelled modules and the loss, while the block runs."""
    stack, handles = [], []

    def enter(label):
        stack.append(record_function(RANGE + label))
        stack[-1].__enter__()

    for module, label in layer_labels(model, pattern).items():
        handles.append(module.register_forward_pre_hook(lambda *_, label=label: enter(label)))
        handles.append(module.register_forward_hook(lambda *_: stack.pop().__exit__(None, None, None)))
    loss_fn = model.compute_language_model_loss

    def loss(*a, **kw):
        with record_function(RANGE + "head+loss"):
            return loss_fn(*a, **kw)

    model.compute_language_model_loss = loss
    try:
        yield
    finally:
        for h in handles:
            h.remove()
        del model.compute_language_model_loss


def attribute(events, device_time: bool, steps: int = 1, top: int = 15) -> dict:
    """Split the profiled time by label. ``events``: ``prof.events()``. ``device_time``: weigh each CPU op by the
    device time of the kernels it launched (GPU); else by its self CPU time (CPU smoke runs). Milliseconds per step:
    per label (fwd / bwd / step / other phase and total), the top kernels of each label, and the ``top`` kernels
    overall; on GPU also the device time of all kernels, attributed or not."""
    per = defaultdict(lambda: defaultdict(float))  # label -> phase -> us
    kernels = defaultdict(lambda: [0.0, 0, defaultdict(float)])  # name -> [us, calls, {label: us}]
    cpu = list(labelled(events))
    for e, label, phase in cpu:
        items = [(k.name, k.duration) for k in e.kernels] if device_time else [(e.name, e.self_cpu_time_total)]
        for name, us in items:
            if name.startswith(RANGE):  # the device-side copy of a profiler range, not a kernel
                continue
            lab = f"comm/{label}" if any(c in name.lower() for c in COMM) else label
            per[lab][phase] += us
            kernels[name][0] += us
            kernels[name][1] += 1
            kernels[name][2][lab] += us
    ms = per_step_ms(steps)
    by_label = {lab: dict({p: ms(v) for p, v in phases.items()}, total=ms(sum(phases.values())))
                for lab, phases in sorted(per.items(), key=lambda kv: -sum(kv[1].values()))}
    for lab in by_label:
        mine = sorted(((v[2][lab], n) for n, v in kernels.items() if lab in v[2]), reverse=True)[:3]
        by_label[lab]["top"] = [[n[:90], ms(us)] for us, n in mine]
    ranked = sorted(kernels.items(), key=lambda kv: -kv[1][0])[:top]
    out = dict(attributed_ms=ms(sum(sum(p.values()) for p in per.values())), by_type=by_label,
               top_kernels=[dict(name=n[:120], ms=ms(v[0]), calls=v[1] / steps, type=max(v[2], key=v[2].get))
                            for n, v in ranked])
    if device_time:  # every device event, attributed or not (a kernel whose launching op was not found is "lost")
        total = sum(e.time_range.elapsed_us() for e in device_events(events))
        out.update(device_total_ms=ms(total), unattributed_ms=round(ms(total) - out["attributed_ms"], 4),
                   **idle_gaps(events, cpu, steps))
    return out


def per_step_ms(steps: int):
    """Microseconds summed over ``steps`` profiled steps -> milliseconds per step."""
    return lambda us: round(us / steps / 1e3, 4)


def device_events(events):
    """The device's own events (kernels, copies): not the CPU ops, nor the device-side copies of profiler ranges."""
    return [e for e in events if e.device_type != torch.autograd.DeviceType.CPU and not e.name.startswith(RANGE)
            and not e.is_user_annotation]


LAUNCH = ("cuda", "cu")  # CUDA runtime / driver API calls (kernel launches, copies, syncs) among the CPU events


def idle_gaps(events, cpu, steps: int, top: int = 12) -> dict:
    """Where the GPU waited for the host: the gaps between the device's busy intervals (kernels, copies), each
    attributed to the label and op of the runtime call that ended last before the gap closed (the launch the GPU
    was waiting for; after a host sync such as the grad norm's .item(), the next launch). Milliseconds per step
    (the profiler's own host overhead inflates them: compare labels, not absolute values with the timed steps).
    ``cpu``: ``labelled(events)`` as a list (the caller has it already)."""
    dev = sorted((e.time_range.start, e.time_range.end) for e in device_events(events))
    gaps, end = [], None
    for a, b in dev:
        if end is not None and a > end:
            gaps.append((end, a))
        end = b if end is None else max(end, b)
    launches = sorted(((e.time_range.end, e, lab) for e, lab, _ in cpu if e.name.startswith(LAUNCH)),
                      key=lambda t: t[0])
    ends = [t[0] for t in launches]
    per_label, per_op = defaultdict(float), defaultdict(float)
    for a, b in gaps:
        i = bisect.bisect_right(ends, b) - 1
        label, op = ("none", "none") if i < 0 else (launches[i][2], _op_name(launches[i][1]))
        per_label[label] += b - a
        per_op[f"{label}: {op}"] += b - a
    ms = per_step_ms(steps)
    return dict(idle_ms=ms(sum(b - a for a, b in gaps)), kernels_per_step=len(dev) / steps,
                idle_by_type={k: ms(v) for k, v in sorted(per_label.items(), key=lambda kv: -kv[1])},
                idle_top_ops=[[k[:100], ms(v)] for k, v in sorted(per_op.items(), key=lambda kv: -kv[1])[:top]])


def _op_name(e) -> str:
    """The op a runtime call was made from: its innermost parent that is not itself a runtime call."""
    while e.cpu_parent is not None and e.name.startswith(LAUNCH):
        e = e.cpu_parent
    return e.name


def labelled(events):
    """(CPU event, label, phase) for every CPU event of a profile."""
    cpu = [e for e in events if e.device_type == torch.autograd.DeviceType.CPU]
    cpu.sort(key=lambda e: e.time_range.start)
    seq_label = {}  # (thread, autograd sequence number) -> label of the forward range that created the node
    for e in cpu:  # an op records the next sequence number; the last op that recorded it is the one that used it
        if e.sequence_nr >= 0 and not e.name.startswith(BACKWARD):
            seq_label[e.thread, e.sequence_nr] = _label(e, seq_label)[0]
    for e in cpu:
        yield (e, *_label(e, seq_label))


def _label(e, seq_label):
    """(label, phase) of a CPU event: the innermost e2e range around it (phase fwd, step, or recompute inside a
    backward node), else the backward node it runs in (phase bwd, label of the node's forward range)."""
    label = phase = None
    while e is not None:
        if label is None and e.name.startswith(RANGE):
            label = e.name[len(RANGE):]
            phase = "step" if label in STEP_LABELS else "fwd"
        elif e.name.startswith(BACKWARD):
            if label is not None:  # a forward re-run inside the backward pass (activation recompute)
                return label, "recompute"
            if "AccumulateGrad" in e.name:  # parameter gradient into Megatron's fp32 main_grad (DDP hook)
                return "grad-accum", "bwd"
            return seq_label.get((e.fwd_thread, e.sequence_nr), "other"), "bwd"
        e = e.cpu_parent
    return (label, phase) if label else ("other", "other")


def profile_steps(train_step, model, pattern: str, device: str, steps: int) -> dict:
    from torch.profiler import ProfilerActivity, profile

    cuda = device == "cuda"
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with layer_ranges(model, pattern), profile(activities=acts) as prof:
        for _ in range(steps):
            train_step()
        if cuda:
            torch.cuda.synchronize()
    return dict(steps=steps, **attribute(prof.events(), device_time=cuda, steps=steps))


# ---------------------------------------------------------------------------------------------------------------
def run_case(name: str, seq: int, args, device, recompute: bool) -> dict:
    cp_rank, cp = parallel_state.get_context_parallel_rank(), args.cp
    seq_global = seq * cp if args.weak else seq
    local = seq_global // cp
    micro = max(1, args.tokens_per_step // local)  # tokens per GPU (per model replica shard) and step
    # Each case compiles Megatron's fusions afresh, as its own training run would: otherwise a shape change from
    # the previous case recompiles them with dynamic shapes (the GPT's fused SwiGLU backward ran 6x slower so).
    torch._dynamo.reset()
    if args.cuda_graphs:  # Megatron keeps its graph records process-wide: the previous case's are stale
        from megatron.core.transformer.cuda_graphs import delete_cuda_graphs

        delete_cuda_graphs()
    spec, ddp, opt = build(name, seq_global, args, device, recompute)
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

    def train_step(step=None):
        if step is not None:  # linear LR warm-up over the untimed steps, then constant
            for group in opt.param_groups:
                group["lr"] = args.lr * min(1.0, (step + 1) / max(1, args.warmup))
        with record_function(RANGE + "zero-grad"):
            ddp.zero_grad_buffer()
            opt.zero_grad()
        loss = ddp(ids, pos, None, labels=labels).float().mean()
        loss.backward()
        if args.cuda_graphs:  # what Megatron's schedules call after each forward-backward (a no-op once captured)
            from megatron.core.transformer.cuda_graphs import create_cudagraphs

            create_cudagraphs()
        with record_function(RANGE + "grad-sync"):
            ddp.finish_grad_sync()
        with record_function(RANGE + "optimizer"):
            if device != "cuda":  # Megatron DDP keeps gradients in .main_grad; the plain optimizer reads .grad
                for prm in ddp.parameters():
                    prm.grad = prm.main_grad
            opt.step()
        return loss

    for step in range(args.warmup + args.steps):
        sync()
        t0 = time.perf_counter()
        loss = train_step(step)
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
    result = dict(model=name, seq=seq_global, backend=args.backend or "default", lr=args.lr, local_seq=local,
                  cuda_graphs=args.cuda_graphs, rope_fusion=args.rope_fusion,
                  micro_batch=micro, tp=args.tp, cp=cp,
                  recompute=recompute, tokens_per_step=micro * local, params=n_params * args.tp,
                  step_ms=step_s * 1e3, tokens_per_s_per_gpu=tok_s / args.tp, tflops_per_gpu=tflops,
                  mfu=(tflops / peak) if peak else None,
                  peak_mem_gib=torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else None,
                  losses=losses, loss_first=losses[0], loss_last=losses[-1], loss_ok=finite and losses[-1] < losses[0])
    if args.profile:  # after the timed steps, so the profiler's overhead is not in the throughput
        try:
            result["profile"] = profile_steps(train_step, ddp.module, spec.config.layer_pattern, device,
                                              args.profile_steps)
        except Exception as exc:  # noqa: BLE001 - keep the throughput row
            result["profile_error"] = f"{type(exc).__name__}: {exc}"[:500]
    return result


def run_guarded(name: str, seq: int, args, device) -> dict:
    """One case; an OOM (retried with full recompute under --recompute-on-oom) or any error becomes a row."""
    row = dict(model=name, seq=seq * (args.cp if args.weak else 1), tp=args.tp, cp=args.cp,
               cuda_graphs=args.cuda_graphs, rope_fusion=args.rope_fusion)
    attempts = [args.recompute] + ([True] if args.recompute_on_oom and not args.recompute else [])
    for recompute in attempts:
        err = None
        try:
            return dict(run_case(name, seq, args, device, recompute), **({"oom_without_recompute": True}
                                                                          if recompute != args.recompute else {}))
        except torch.OutOfMemoryError:
            err = dict(row, recompute=recompute, oom=True)
        except Exception as exc:  # noqa: BLE001 - one failing case must not stop the others
            return dict(row, recompute=recompute, error=f"{type(exc).__name__}: {exc}"[:500])
        finally:
            if device == "cuda":
                torch.cuda.empty_cache()
    return err


def fmt_row(r: dict) -> str:
    head = f"| {r['model']} | {r['seq']} | {r['tp']} | {r['cp']} | {'yes' if r.get('recompute') else 'no'} |"
    if r.get("oom") or r.get("error"):
        return head + (" OOM |" if r.get("oom") else f" error: {r['error'][:60]} |") + " | | | |"
    mfu = f"{100 * r['mfu']:.1f}%" if r["mfu"] else "-"
    mem = f"{r['peak_mem_gib']:.1f}" if r["peak_mem_gib"] else "-"
    guard = "" if r["loss_ok"] else " GUARD FAILED"
    return head + (f" {r['tokens_per_s_per_gpu']:,.0f} | {r['tflops_per_gpu']:.1f} | {mfu} | {mem} | "
                   f"{r['loss_first']:.3f}->{r['loss_last']:.3f}{guard} |")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--models", nargs="+")
    p.add_argument("--seq", nargs="+", type=int, help="sequence lengths (per CP rank with --weak)")
    p.add_argument("--tokens-per-step", type=int, help="tokens per GPU (model replica shard) and step")
    p.add_argument("--steps", type=int, help="timed steps (median reported)")
    p.add_argument("--warmup", type=int)
    p.add_argument("--lr", type=float, default=1e-4, help="Adam learning rate, reached linearly over --warmup steps "
                   "(at 3e-4 BASED memorized the repeated batch within the warm-up, then oscillated at T = 32k)")
    p.add_argument("--backend", choices=["triton", "torch"], help="based_kernels backend (default: Triton on GPU); "
                   "torch runs the mixers on the PyTorch reference path, for a loss comparison")
    p.add_argument("--no-fused-adam", dest="fused_adam", action="store_false",
                   help="keep Megatron's fallback torch AdamW (foreach) instead of torch's fused AdamW, and "
                   "its Python-loop gradient norm and scaling instead of torch's foreach kernels")
    p.add_argument("--no-rope-fusion", dest="rope_fusion", action="store_false",
                   help="S and A layers: Megatron's q/k/v split and apply_rotary_pos_emb instead of "
                   "based_kernels.rope_split_qkv (one kernel each way)")
    p.add_argument("--cross-entropy", choices=["triton", "native"],
                   help="fused cross entropy of bf16 GPU runs (default: the config's, triton)")
    p.add_argument("--cuda-graphs", action="store_true",
                   help="Megatron-Core's CUDA graphs of the decoder layers (cuda_graph_impl='local': each layer's "
                   "forward and backward captured after the first step, then replayed); the per-layer-type profile "
                   "then sees graph replays, not layers")
    p.add_argument("--tp", type=int, default=1)
    p.add_argument("--cp", type=int, default=1)
    p.add_argument("--weak", action="store_true", help="with --cp: the sequence grows with the GPUs")
    p.add_argument("--recompute", action="store_true", help="full activation recompute (uniform, 1 layer)")
    p.add_argument("--recompute-on-oom", action="store_true", help="retry a case that runs out of memory with "
                   "--recompute (the row says so)")
    p.add_argument("--profile", action="store_true", default=None,
                   help="also profile --profile-steps steps: time per layer type and per kernel")
    p.add_argument("--profile-steps", type=int, default=2)
    p.add_argument("--smoke", action="store_true", help=f"tiny CPU-size defaults: {SMOKE}")
    p.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results", "train_throughput.json"))
    p.add_argument("--append", action="store_true", help="add the rows to --out if it exists")
    args = p.parse_args(argv)
    for k, v in (SMOKE if args.smoke else DEFAULTS).items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    if args.weak and args.cp == 1:
        p.error("--weak needs --cp > 1")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.backend:
        import based_kernels

        based_kernels.use_backend(args.backend)
    initialize_parallel(args.tp, 1, args.cp, seed=1234, cuda_graphs=args.cuda_graphs)
    rank = torch.distributed.get_rank()
    if args.cuda_graphs:  # Megatron's capture summary per case, not its per-graph progress bar
        report_cuda_graph_captures(lambda line: print(f"  {line}", flush=True))
    meta = dict(date=str(date.today()), device=torch.cuda.get_device_name() if device == "cuda" else "cpu",
                torch=torch.__version__, world_size=torch.distributed.get_world_size(), runs=[vars(args)])
    doc = dict(meta=meta, results=[])
    if args.append and os.path.exists(args.out):
        with open(args.out) as fh:
            doc = json.load(fh)
        doc["meta"].setdefault("runs", []).append(vars(args))
    results = []
    for seq in args.seq:  # sequence-major: a run cut short still has every model at the first lengths
        for name in args.models:
            r = run_guarded(name, seq, args, device)
            results.append(r)
            if rank == 0:
                print(json.dumps({k: v for k, v in r.items() if k not in ("profile", "losses")}), flush=True)
                if "profile" in r:
                    print(profile_summary(r), flush=True)
                doc["results"].append(r)  # written after every case: a run killed by a timeout keeps its rows
                os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
                with open(args.out, "w") as fh:
                    json.dump(doc, fh, indent=1)
    if rank == 0:
        print("\n| model | T | tp | cp | recompute | tokens/s/GPU | TFLOP/s/GPU | MFU | peak GiB | loss first->last |")
        print("|---|---|---|---|---|---|---|---|---|---|")
        for r in results:
            print(fmt_row(r))
        print(f"wrote {args.out}")
    torch.distributed.destroy_process_group()


def profile_summary(r: dict) -> str:
    prof = r["profile"]
    total = prof.get("device_total_ms", prof["attributed_ms"])
    parts = ", ".join(f"{lab} {v['total']:.1f}" for lab, v in prof["by_type"].items() if v["total"] >= 0.01 * total)
    out = f"  profile {r['model']} T={r['seq']}: {total:.1f} ms/step ({parts})"
    if "idle_ms" in prof:
        idle = ", ".join(f"{lab} {v:.1f}" for lab, v in list(prof["idle_by_type"].items())[:6])
        out += (f"\n  GPU idle {prof['idle_ms']:.1f} ms/step, {prof['kernels_per_step']:.0f} kernels/step (waiting "
                f"for: {idle}); top: " + "; ".join(f"{k} {v:.1f}" for k, v in prof["idle_top_ops"][:5]))
    return out


if __name__ == "__main__":
    main()
