"""Generation throughput: BASED (constant-size caches) vs a same-size Megatron GPT with softmax attention and a KV
cache (SDPA, FlashAttention kernels on GPU), as in the BASED paper (1.3B, batch 128, 1024 new tokens: 24x).

    python benchmarks/generation.py                        # GPU: based-1.3b vs GPT, bf16, batch 128, 1024 tokens
    python benchmarks/generation.py --tiny                 # CPU check: configs/tiny.yaml, batch 4, 32 tokens

Both models use the same width, depth, heads, MLP and vocabulary; the GPT has layer pattern "A" * num_layers.
Before timing, each model's prefill + decode logits are checked against its full forward. Reported: decode
tokens/s (batch * new tokens / decode time), prefill time, cache bytes per sequence and peak memory per sequence
beyond the weights. Prints a table and writes JSON.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def build(section: dict, pattern: str, dtype: torch.dtype):
    from megatron_based.config import model_spec_from_dict
    from megatron_based.model import build_model

    section = {**section, "layer_pattern": pattern}
    spec = model_spec_from_dict(section, params_dtype=dtype, bf16=dtype == torch.bfloat16,
                                use_cpu_initialization=not torch.cuda.is_available())
    model = build_model(spec.config, vocab_size=spec.vocab_size, max_sequence_length=spec.seq_length)
    return (model.cuda() if torch.cuda.is_available() else model).eval(), spec


@torch.no_grad()
def check(model, gen, vocab: int, prompt_len: int, steps: int = 4) -> float:
    """Max |prefill/decode logits - full forward logits| / max |logits| on two sequences."""
    device = gen.device
    tokens = torch.randint(0, vocab, (2, prompt_len + steps), device=device)
    T = tokens.shape[1]
    full = model(tokens, torch.arange(T, device=device).expand(2, T), attention_mask=None)[..., :vocab].float()
    got = [gen.prefill(tokens[:, :prompt_len])]
    for t in range(steps - 1):
        got.append(gen.step(tokens[:, prompt_len + t]))
    got = torch.stack(got, dim=1)
    want = full[:, prompt_len - 1: prompt_len - 1 + steps]
    return ((got - want).abs().max() / want.abs().max()).item()


def run(name, model, spec, args, cuda_graph: bool) -> dict:
    from megatron_based.generation import Generator

    total = args.prompt_length + args.new_tokens
    gen = Generator(model, vocab_size=spec.vocab_size, max_length=total, cuda_graph=cuda_graph)
    rel_err = check(model, gen, spec.vocab_size, args.prompt_length)
    prompts = torch.randint(0, spec.vocab_size, (args.batch, args.prompt_length), device=gen.device)
    weights = torch.cuda.memory_allocated() if torch.cuda.is_available() else 0

    def once(new_tokens: int):
        sync()
        t0 = time.perf_counter()
        logits = gen.prefill(prompts)
        sync()
        t1 = time.perf_counter()
        for _ in range(new_tokens - 1):
            logits = gen.step(logits.argmax(-1))
        sync()
        return t1 - t0, time.perf_counter() - t1

    once(min(8, args.new_tokens))  # warm-up (and CUDA-graph capture)
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    prefill_s, decode_s = once(args.new_tokens)
    peak = torch.cuda.max_memory_allocated() - weights if torch.cuda.is_available() else None
    n_params = sum(p.numel() for p in model.parameters())
    return {
        "model": name, "layer_pattern": spec.config.layer_pattern, "parameters": n_params,
        "cuda_graph": cuda_graph, "batch": args.batch, "prompt_length": args.prompt_length,
        "new_tokens": args.new_tokens, "prefill_s": prefill_s, "decode_s": decode_s,
        "decode_tokens_per_s": args.batch * (args.new_tokens - 1) / decode_s,
        "cache_bytes_per_sequence": gen.cache_bytes() // args.batch,
        "peak_bytes_per_sequence": None if peak is None else peak // args.batch,
        "check_rel_err": rel_err,
    }


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="configs/based-1.3b.yaml")
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--prompt-length", type=int, default=128)
    p.add_argument("--new-tokens", type=int, default=1024)
    p.add_argument("--dtype", choices=["bf16", "fp32"], default=None, help="default: bf16 on GPU, fp32 on CPU")
    p.add_argument("--no-cuda-graph", action="store_true", help="skip the CUDA-graph BASED run")
    p.add_argument("--tiny", action="store_true", help="CPU check: configs/tiny.yaml, batch 4, prompt 8, 32 tokens")
    p.add_argument("--json", default="benchmarks/results/generation.json")
    args = p.parse_args(argv)
    if args.tiny:
        args.config, args.batch, args.prompt_length, args.new_tokens = "configs/tiny.yaml", 4, 8, 32
    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[args.dtype or ("bf16" if torch.cuda.is_available()
                                                                          else "fp32")]
    os.environ.setdefault("MASTER_PORT", str(29500 + os.getpid() % 1000))
    from megatron_based.parallel import initialize_parallel

    initialize_parallel(1)
    with open(args.config) as fh:
        section = yaml.safe_load(fh)["model"]
    # fp32 on the GPU runs the Triton kernels' dots in tf32 (~1e-3 relative; measured 2.3e-4 on H100 for
    # based-360m); on the CPU fp32 is exact to ~1e-6. bf16: see docs/generation.md (0.05 measured at 1.3B).
    tol = 0.05 if dtype == torch.bfloat16 else (2e-3 if torch.cuda.is_available() else 1e-4)
    results = []
    variants = [("BASED", section["layer_pattern"], False)]
    if torch.cuda.is_available() and not args.no_cuda_graph:
        variants.append(("BASED", section["layer_pattern"], True))
    variants.append(("GPT (SDPA, KV cache)", "A" * len(section["layer_pattern"]), False))
    for name, pattern, graph in variants:
        model, spec = build(section, pattern, dtype)
        try:
            r = run(name, model, spec, args, graph)
        except torch.cuda.OutOfMemoryError as e:
            r = {"model": name, "cuda_graph": graph, "error": f"out of memory: {e}".splitlines()[0]}
        if "error" not in r and r["check_rel_err"] > tol:
            raise SystemExit(f"{name}: decode logits differ from the full forward by {r['check_rel_err']:.3g} "
                             f"(relative) > {tol}: not timing a wrong model")
        results.append(r)
        del model
        if torch.cuda.is_available():
            torch.cuda.empty_cache()

    from rich.console import Console
    from rich.table import Table

    base = next((r for r in results if r["model"].startswith("GPT") and "error" not in r), None)
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU"
    table = Table(title=f"generation, batch {args.batch}, prompt {args.prompt_length}, {args.new_tokens} new tokens, "
                        f"{str(dtype).split('.')[-1]}, {device}")
    for col in ("model", "params", "CUDA graph", "prefill ms", "decode tok/s", "vs GPT", "cache MiB/seq",
                "peak MiB/seq", "check"):
        table.add_column(col)
    mib = lambda b: "-" if b is None else f"{b / 2**20:.2f}"  # noqa: E731
    for r in results:
        if "error" in r:
            table.add_row(r["model"], "", str(r["cuda_graph"]), r["error"], "", "", "", "", "")
            continue
        speedup = f"{r['decode_tokens_per_s'] / base['decode_tokens_per_s']:.1f}x" if base else "-"
        table.add_row(r["model"], f"{r['parameters'] / 1e9:.3f}B", str(r["cuda_graph"]), f"{r['prefill_s'] * 1e3:.1f}",
                      f"{r['decode_tokens_per_s']:,.0f}", speedup, mib(r["cache_bytes_per_sequence"]),
                      mib(r["peak_bytes_per_sequence"]), f"{r['check_rel_err']:.1e}")
    Console(width=150).print(table)
    meta = {"torch": torch.__version__, "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
            "date": time.strftime("%Y-%m-%d"), "config": args.config, "dtype": str(dtype)}
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps({"meta": meta, "results": results}, indent=1))
    print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
