"""Generation throughput: BASED (constant-size caches) vs a same-size Megatron GPT with softmax attention and a KV
cache (SDPA, FlashAttention kernels on GPU), as in the BASED paper (1.3B, batch 128, 1024 new tokens: 24x).

    python benchmarks/generation.py --json "$OUT/generation.json"   # GPU: based-1.3b vs GPT, bf16 (~3 min, H100)
    python benchmarks/generation.py --tiny                          # CPU check: configs/tiny.yaml, batch 4, 32 tokens
    python benchmarks/generation.py --cuda-graph-only --profile 20  # also where a decode step's time goes

Both models have the same width, depth, heads, MLP and vocabulary (random weights); the GPT has layer pattern
"A" * num_layers. For each model:

1. Guard: two ragged prompts (lengths crossing the SWA window) are prefilled and decoded teacher-forced; the
   decode logits and the model's own full-forward logits are both compared with a full forward of the same weights
   in higher precision (fp32 on GPU, fp64 on CPU). The guard passes when decode's relative RMS error is within 2x
   of the full forward's own (bf16 rounding over 36 layers is expected in both; a decode bug adds O(1) errors).
   A model that fails is not timed.
2. Timing: prefill ``--batch`` prompts of ``--prompt-length`` random tokens, then greedy decode to
   ``--new-tokens`` tokens (once short as a warm-up, which also captures the CUDA graph, then timed). Both models
   run eagerly and with the decode step in CUDA graphs (captured at the warm-up's prefill). The GPT's eager step
   attends over the rows written so far (FlashAttention kernels); its graphed steps, one graph per KV-length
   bucket (multiples of 256 up to prompt + new tokens, ``kv_length_buckets``), over the smallest bucket holding
   the sequence, with a mask from the positions on the device, as a graph needs fixed shapes (the JSON row lists
   the buckets). "vs GPT" compares with the GPT's faster decode.
   If the GPT's KV cache does not fit at ``--batch``, the batch is halved until it does (recorded in the JSON).

``--profile STEPS`` (after timing) splits a decode step by layer type and kernel. A CUDA-graphed step runs no
Python of the model, so its kernels carry no layer labels: its profile gives the device busy / idle time and kernel
count per step, and the per-layer split comes from its static eager twin (``static_decode``: the same fixed-shape
step run eagerly, launching the same kernels in the same order), profiled for as many steps (``profile_static``).

Reported: decode tokens/s (batch x (new tokens - 1) / decode time), prefill time, cache bytes per sequence and
peak memory per sequence beyond the weights. Prints a table and writes JSON; one failing part does not stop the
others (its error is in the JSON).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
import traceback
from pathlib import Path

from megatron_based.runtime.noise import quiet_known_warnings

if __name__ == "__main__":  # run as a script (not imported by the tests), before Megatron is imported
    quiet_known_warnings()  # the entry points' filter: Megatron's known notices stay out of the benchmark's output
import torch  # noqa: E402


CUDA = torch.cuda.is_available()


def sync():
    if CUDA:
        torch.cuda.synchronize()


def build(section: dict, pattern: str, dtype: torch.dtype, initialize: bool = True):
    from megatron_based.model.config import model_spec_from_dict
    from megatron_based.model import build_model

    section = {**section, "layer_pattern": pattern}
    if dtype == torch.float32:  # a no-op in fp32; keeps the CPU reference (this model .double()) fp64 throughout
        section["fp32_residual_connection"] = False
    spec = model_spec_from_dict(section, params_dtype=dtype, bf16=dtype == torch.bfloat16,
                                use_cpu_initialization=not CUDA, perform_initialization=initialize)
    model = build_model(spec.config, vocab_size=spec.vocab_size, max_sequence_length=spec.seq_length,
                        make_vocab_size_divisible_by=spec.make_vocab_size_divisible_by)
    return (model.cuda() if CUDA else model).eval(), spec


@torch.inference_mode()
def full_logits(model, tokens, vocab: int) -> torch.Tensor:
    T = tokens.shape[1]
    return model(tokens, torch.arange(T, device=tokens.device).expand_as(tokens), attention_mask=None)[..., :vocab]


def guard_data(model, spec, section, pattern, dtype, args) -> dict:
    """Guard inputs and the two full forwards: this model's, and the same weights' in higher precision."""
    from megatron_based.inference.generation import at_decode_positions

    Ps, steps = args.guard_prompts, args.guard_steps
    tokens = torch.randint(0, spec.vocab_size, (len(Ps), max(Ps) + steps - 1),
                           generator=torch.Generator().manual_seed(0)).to(model.embedding.word_embeddings.weight.device)
    full = at_decode_positions(full_logits(model, tokens, spec.vocab_size), Ps, steps).float()
    ref_dtype = torch.float32 if CUDA else torch.float64
    if dtype == ref_dtype:  # no higher precision to compare with: the model is its own reference
        return dict(tokens=tokens, full=full, reference=full, reference_dtype=str(ref_dtype))
    if CUDA:
        reference, _ = build(section, pattern, torch.float32, initialize=False)
    else:
        reference, _ = build(section, pattern, torch.float32)
        reference = reference.double()
    with torch.no_grad():
        for ref_param, param in zip(reference.parameters(), model.parameters(), strict=True):
            ref_param.copy_(param)
    ref = at_decode_positions(full_logits(reference, tokens, spec.vocab_size), Ps, steps)
    del reference
    if CUDA:
        torch.cuda.empty_cache()
    return dict(tokens=tokens, full=full, reference=ref, reference_dtype=str(ref_dtype))


def guard(gen, data, args, dtype) -> dict:
    from megatron_based.inference.generation import decode_error_report, teacher_forced_logits

    decode = teacher_forced_logits(gen, data["tokens"], args.guard_prompts, args.guard_steps)
    # Same precision as the reference (fp32): only the kernels' tf32 dots on GPU (~1e-3), summation order on CPU.
    atol = 0.0 if dtype == torch.bfloat16 else (2e-3 if CUDA else 1e-5)
    report = decode_error_report(decode, data["full"], data["reference"], factor=2.0, atol=atol)
    return {**report, "reference_dtype": data["reference_dtype"], "prompt_lengths": args.guard_prompts,
            "decode_steps": args.guard_steps}


def timed(gen, spec, batch: int, args) -> dict:
    prompts = torch.randint(0, spec.vocab_size, (batch, args.prompt_length), device=gen.device)

    def once(new_tokens: int):
        sync()
        t0 = time.perf_counter()
        logits = gen.prefill(prompts)
        sync()
        t1 = time.perf_counter()
        for i in range(new_tokens - 1):
            logits = gen.step(logits.argmax(-1))
            if (i + 1) % 256 == 0:  # progress (a sync every 256 steps costs nothing measurable)
                sync()
                print(f"    batch {batch}: {i + 1} tokens decoded in {time.perf_counter() - t1:.1f} s", flush=True)
        sync()
        return t1 - t0, time.perf_counter() - t1

    gen.release()
    if CUDA:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated() if CUDA else 0
    once(min(8, args.new_tokens))  # warm-up; allocates the caches, captures the CUDA graphs (same batch: reused)
    prefill_s, decode_s = once(args.new_tokens)
    peak = torch.cuda.max_memory_allocated() - base if CUDA else None
    return {"batch": batch, "prefill_s": prefill_s, "decode_s": decode_s,
            "decode_tokens_per_s": batch * (args.new_tokens - 1) / decode_s,
            "tokens_per_s_with_prefill": batch * args.new_tokens / (prefill_s + decode_s),
            "cache_bytes_per_sequence": gen.cache_bytes() // batch,
            "peak_bytes_per_sequence": None if peak is None else peak // batch}


def timed_fitting(gen, spec, args) -> dict:
    """Time at ``--batch``; on out-of-memory halve the batch until it fits (the GPT's KV cache grows with length)."""
    batch, tried = args.batch, []
    while batch >= 1:
        try:
            r = timed(gen, spec, batch, args)
            if tried:
                r["batch_note"] = (f"out of memory at batch {', '.join(map(str, tried))}; timed at the largest "
                                   f"batch that fits, {batch}")
            return r
        except torch.cuda.OutOfMemoryError:
            tried.append(batch)
            gen.release()
            torch.cuda.empty_cache()
            batch //= 2
    raise RuntimeError(f"out of memory even at batch 1 (tried {tried})")


def profile_decode(gen, model, pattern: str, spec, batch: int, args) -> dict:
    """Where a decode step's time goes: a prefill of ``batch`` random prompts, 8 untimed steps, then ``--profile``
    steps under torch.profiler, split as train_throughput.py splits a training step (its ``attribute``): per layer
    type (each mixer's ``step`` under its pattern letter; MLP, norm, embedding, head+loss by module) with the top
    kernels, and on GPU the device's busy and idle time per step. A CUDA-graphed step replays its graph without
    running any Python of the model, so its kernels stay unlabelled (``unattributed_ms``): its device busy / idle
    time and kernel count per step are what it shows; :func:`profile_static_twin` gives its per-layer split."""
    import train_throughput as tt
    from torch.autograd.profiler import record_function
    from torch.profiler import ProfilerActivity, profile

    steps = min(args.profile, args.new_tokens - 9)
    prompts = torch.randint(0, spec.vocab_size, (batch, args.prompt_length), device=gen.device)
    logits = gen.prefill(prompts)
    for _ in range(8):
        logits = gen.step(logits.argmax(-1))
    labelled = []
    for layer in model.decoder.layers:
        mixer, label = layer.self_attention, pattern[layer.layer_number - 1]

        def step(*a, _step=mixer.step, _label=label, **kw):
            with record_function(tt.RANGE + _label):
                return _step(*a, **kw)
        mixer.step = step  # an instance attribute over the method, removed below
        labelled.append(mixer)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if CUDA else [])
    try:
        sync()
        t0 = time.perf_counter()
        with tt.layer_ranges(model, pattern), profile(activities=activities) as prof:
            for _ in range(steps):
                logits = gen.step(logits.argmax(-1))
            sync()
        wall_ms = (time.perf_counter() - t0) * 1e3 / steps
    finally:
        for mixer in labelled:
            del mixer.step
        gen.release()
    return dict(steps=steps, batch=batch, wall_ms_per_step=round(wall_ms, 4),
                **tt.attribute(prof.events(), device_time=CUDA, steps=steps))


def profile_static_twin(model, pattern: str, spec, batch: int, max_length: int, args) -> dict:
    """The per-layer split of a CUDA-graphed decode step: :func:`profile_decode` of a ``static_decode`` Generator of
    the same model and ``max_length``, which runs the graph's fixed-shape step eagerly (the same kernels in the same
    order, plus one copy of the logits into the "replay" output), so the layer ranges open. Its kernel times are
    those of the eager launches; its device busy time is the number comparable with the graphed step's. The twin's
    caches are released afterwards."""
    from megatron_based.inference.generation import Generator

    twin = Generator(model, vocab_size=spec.vocab_size, max_length=max_length, static_decode=True)
    try:
        return profile_decode(twin, model, pattern, spec, batch, args)
    finally:
        twin.release()
        if CUDA:
            torch.cuda.empty_cache()


def profile_line(prof: dict) -> str:
    """One line: the step's wall time (under the profiler), device busy / idle time, and the layer types."""
    parts = [f"step {prof['wall_ms_per_step']:.2f} ms under the profiler"]
    if "device_total_ms" in prof:
        parts.append(f"device busy {prof['device_total_ms']:.2f}, idle {prof['idle_ms']:.2f}, "
                     f"{prof['kernels_per_step']:.0f} kernels")
    parts.append(", ".join(f"{lab} {v['total']:.2f}" for lab, v in prof["by_type"].items()))
    return "; ".join(parts)


def error_text(e: BaseException) -> str:
    where = traceback.extract_tb(e.__traceback__)[-1]
    return f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''} ({where.filename}:{where.lineno})"


def bench_model(name, section, pattern, graphs, dtype, args) -> list[dict]:
    from megatron_based.inference.generation import Generator

    out = []
    try:
        t0 = time.perf_counter()
        model, spec = build(section, pattern, dtype)
        print(f"  {name}: built in {time.perf_counter() - t0:.1f} s", flush=True)
        data = guard_data(model, spec, section, pattern, dtype, args)
        setup_s = time.perf_counter() - t0
        print(f"  {name}: guard forwards done, {setup_s:.1f} s", flush=True)
    except Exception as e:  # noqa: BLE001 - report and go on with the other model
        return [{"model": name, "layer_pattern": pattern, "error": f"build/guard set-up: {error_text(e)}"}]
    n_params = sum(p.numel() for p in model.parameters())
    max_length = max(args.prompt_length + args.new_tokens, max(args.guard_prompts) + args.guard_steps)
    for graph in graphs:
        r = {"model": name, "layer_pattern": pattern, "parameters": n_params, "cuda_graph": graph,
             "batch_requested": args.batch, "prompt_length": args.prompt_length, "new_tokens": args.new_tokens,
             "setup_s": setup_s}
        out.append(r)
        gen = None
        try:
            gen = Generator(model, vocab_size=spec.vocab_size, max_length=max_length, cuda_graph=graph)
            if graph and gen.kv_buckets != [None]:
                r["kv_buckets"] = gen.kv_buckets
            r["guard"] = guard(gen, data, args, dtype)
            if not r["guard"]["passed"]:
                r["error"] = "guard failed: decode logits are further from the reference than 2x the full forward's"
                continue
            print(f"  {name} cuda_graph={graph}: guard passed, timing", flush=True)
            r.update(timed_fitting(gen, spec, args))
            if args.profile:
                r["profile"] = profile_decode(gen, model, pattern, spec, r["batch"], args)
                print(f"  {name} cuda_graph={graph} profile (ms per step): {profile_line(r['profile'])}", flush=True)
                if gen.cuda_graph:  # its kernels are unlabelled: the per-layer split from its static eager twin
                    r["profile_static"] = profile_static_twin(model, pattern, spec, r["batch"], max_length, args)
                    print(f"  {name} cuda_graph={graph} static (eager) step profile (ms per step): "
                          f"{profile_line(r['profile_static'])}", flush=True)
        except Exception as e:  # noqa: BLE001
            r["error"] = error_text(e)
        finally:
            if gen is not None:
                gen.release()
            if CUDA:
                torch.cuda.empty_cache()
        print(f"  {name} cuda_graph={graph}: " + (r.get("error") or f"{r['decode_tokens_per_s']:,.0f} tok/s")
              + (f" (guard decode {r['guard']['decode_rel_rms']:.2e} vs full {r['guard']['full_forward_rel_rms']:.2e})"
                 if "guard" in r else ""), flush=True)
    del model, data
    if CUDA:
        torch.cuda.empty_cache()
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="configs/based-1.3b.yaml")
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--prompt-length", type=int, default=128)
    p.add_argument("--new-tokens", type=int, default=1024)
    p.add_argument("--guard-prompts", type=int, nargs="+", default=[136, 100],
                   help="prompt lengths of the guard (default: crossing the 129-row SWA ring)")
    p.add_argument("--guard-steps", type=int, default=8)
    p.add_argument("--dtype", choices=["bf16", "fp32"], default=None, help="default: bf16 on GPU, fp32 on CPU")
    p.add_argument("--models", nargs="+", choices=["based", "gpt"], default=["based", "gpt"])
    p.add_argument("--no-cuda-graph", action="store_true", help="skip the CUDA-graph runs")
    p.add_argument("--cuda-graph-only", action="store_true",
                   help="only the CUDA-graph runs (the fair comparison; the GPT's eager decode takes minutes)")
    p.add_argument("--profile", type=int, default=0, metavar="STEPS",
                   help="after timing, profile this many decode steps per run (at most --new-tokens - 9): "
                        "time per layer type and kernel (the JSON's profile), device busy / idle time on GPU. A "
                        "CUDA-graphed step's kernels are unlabelled: its per-layer split comes from its static eager "
                        "twin (static_decode, the same kernels; their times are the eager launches', the device "
                        "busy time is the comparable number), profiled for as many steps (profile_static)")
    p.add_argument("--tiny", action="store_true", help="CPU check: configs/tiny.yaml, batch 4, prompt 8, 32 tokens")
    p.add_argument("--json", default=None, help="where the results go (default benchmarks/results/generation.json; "
                   "with --tiny, none: a CPU check must not replace the GPU results)")
    args = p.parse_args(argv)
    if args.tiny:
        args.config, args.batch, args.prompt_length, args.new_tokens = "configs/tiny.yaml", 4, 8, 32
        args.guard_prompts, args.guard_steps = [40, 20], 6
    elif args.json is None:
        args.json = "benchmarks/results/generation.json"
    if args.profile < 0:
        p.error(f"--profile STEPS must be >= 0 (got {args.profile})")
    if args.profile and args.new_tokens <= 9:
        p.error(f"--profile needs --new-tokens >= 10 (got {args.new_tokens}): it decodes 8 untimed steps, then "
                "min(--profile, --new-tokens - 9) profiled steps")
    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[args.dtype or ("bf16" if CUDA else "fp32")]
    os.environ.setdefault("MASTER_PORT", str(29500 + os.getpid() % 1000))
    from megatron_based.runtime.parallel import initialize_parallel

    initialize_parallel(1)
    from megatron_based.model.config import ConfigError, read_model_section

    try:
        section = read_model_section(args.config)
    except (ConfigError, OSError) as e:
        p.error(str(e))
    t_start = time.perf_counter()
    results = []
    if args.cuda_graph_only and (args.no_cuda_graph or not CUDA):
        p.error("--cuda-graph-only needs a GPU and excludes --no-cuda-graph")
    graphs = [True] if args.cuda_graph_only else [False] + ([True] if CUDA and not args.no_cuda_graph else [])
    if "based" in args.models:
        results += bench_model("BASED", section, section["layer_pattern"], graphs, dtype, args)
    if "gpt" in args.models:  # graphed: a static KV cache of max_length rows, one graph per KV-length bucket
        results += bench_model("GPT (SDPA, KV cache)", section, "A" * len(section["layer_pattern"]), graphs,
                               dtype, args)

    from rich.console import Console
    from rich.table import Table

    # the baseline: the GPT's fastest decode (with its CUDA graph where that is faster)
    gpt = max((r for r in results if r["model"].startswith("GPT") and "decode_tokens_per_s" in r),
              key=lambda r: r["decode_tokens_per_s"], default=None)
    device = torch.cuda.get_device_name() if CUDA else "CPU"
    table = Table(title=f"generation, prompt {args.prompt_length}, {args.new_tokens} new tokens, "
                        f"{str(dtype).split('.')[-1]}, {device}")
    for col in ("model", "params", "CUDA graph", "batch", "prefill ms", "decode tok/s", "vs GPT", "cache MiB/seq",
                "peak MiB/seq", "guard rms: decode / full"):
        table.add_column(col)
    mib = lambda b: "-" if b is None else f"{b / 2**20:.2f}"  # noqa: E731
    for r in results:
        g = r.get("guard")
        g_txt = f"{g['decode_rel_rms']:.1e} / {g['full_forward_rel_rms']:.1e}" if g else "-"
        if "decode_tokens_per_s" not in r:
            table.add_row(r["model"], "", str(r.get("cuda_graph")), "", r.get("error", "")[:60], "", "", "", "", g_txt)
            continue
        speedup = f"{r['decode_tokens_per_s'] / gpt['decode_tokens_per_s']:.1f}x" if gpt else "-"
        table.add_row(r["model"], f"{r['parameters'] / 1e9:.3f}B", str(r["cuda_graph"]), str(r["batch"]),
                      f"{r['prefill_s'] * 1e3:.1f}", f"{r['decode_tokens_per_s']:,.0f}", speedup,
                      mib(r["cache_bytes_per_sequence"]), mib(r["peak_bytes_per_sequence"]), g_txt)
    Console(width=170).print(table)
    meta = {"torch": torch.__version__, "device": device, "date": time.strftime("%Y-%m-%d"), "config": args.config,
            "dtype": str(dtype), "total_s": time.perf_counter() - t_start,
            "speedup_note": "vs GPT compares decode tokens/s; check each row's batch (the GPT's may be smaller)"}
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps({"meta": meta, "results": results}, indent=1))
        print(f"wrote {args.json} ({meta['total_s']:.0f} s)")
    return 0 if all("error" not in r for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
