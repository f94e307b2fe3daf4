"""What an fp32 residual stream (``fp32_residual_connection``, BASED's default in bf16) does to bf16 accuracy.

The BASED authors train with ``residual_in_fp32: true``: the residual stream between layers stays fp32, each
RMSNorm reads it and feeds its mixer / MLP in the model dtype, and each block output is added to it in fp32. This
script builds a model of configs/based-360m.yaml's ``model:`` section with random weights (bf16-rounded), runs the
same random tokens through

- the same weights in fp32 (the reference),
- bf16 with the residual stream in bf16 (``fp32_residual_connection: false``, what this project did before),
- bf16 with the residual stream in fp32 (``fp32_residual_connection: true``, the default now),

and reports each bf16 model's logits' relative RMS error vs the reference (``|a - ref|_2 / |ref|_2``): the full
forward over ``--batch`` x ``--seq`` tokens, and the generation path (``Generator``: prefill of ``seq - steps + 1``
tokens, then ``steps - 1`` teacher-forced decode steps; the ``steps`` logits against the reference's full forward
at the same positions). The same for a same-size GPT (layer pattern "A" x num_layers, same width, heads, MLP).

    python benchmarks/residual_precision.py                      # CPU: based-360m size, B1 T512 (minutes)
    python benchmarks/residual_precision.py --per-mixer          # also 'C' x 27, 'L' x 27, 'S' x 27 (full forward)
    python benchmarks/residual_precision.py --layers 6 --seq 128  # a quicker CPU look
    python benchmarks/residual_precision.py --gpu                # GPU: training-step time, with and without
    python benchmarks/residual_precision.py --gpu --cuda-graphs  # the same with Megatron's per-layer CUDA graphs

Speed is not measured on CPU. ``--gpu`` times real training steps (forward, backward, optimizer: the
``benchmarks/train_throughput.py`` harness, bf16, synthetic tokens) of based-360m at T2048 with the residual in fp32
and in bf16, and writes ``benchmarks/results/residual_precision_gpu.json``; the fp32 residual reads and writes
twice the bytes per residual element (embedding output, two adds per layer, the norms' inputs, their saved
activations), so the effect is expected to be small but has to be measured there.

Writes ``benchmarks/results/residual_precision.json`` (``--out``).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from datetime import date
from pathlib import Path

from megatron_based.runtime.noise import quiet_known_warnings

if __name__ == "__main__":  # before torch and Megatron warn: the entry points' filter of their known notices
    quiet_known_warnings()
import torch  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
CUDA = torch.cuda.is_available()


def model_section(config: str = "based-360m", layers: int | None = None, pattern: str | None = None) -> dict:
    """The YAML ``model:`` section, optionally with only the first ``layers`` symbols of its pattern or another
    pattern (e.g. "A" x n: the same-size GPT)."""
    from megatron_based.model.config import read_model_section

    section = dict(read_model_section(ROOT / "configs" / f"{config}.yaml"))
    if pattern is not None:
        section["layer_pattern"] = pattern
    if layers is not None:
        section["layer_pattern"] = section["layer_pattern"][:layers]
    section.pop("num_layers", None)
    return section


def build(section: dict, dtype: torch.dtype, fp32_residual: bool, initialize: bool = True):
    from megatron_based.model import build_model
    from megatron_based.model.config import model_spec_from_dict

    spec = model_spec_from_dict({**section, "fp32_residual_connection": fp32_residual}, params_dtype=dtype,
                                bf16=dtype == torch.bfloat16, use_cpu_initialization=not CUDA,
                                perform_initialization=initialize)
    model = build_model(spec.config, vocab_size=spec.vocab_size, max_sequence_length=spec.seq_length,
                        make_vocab_size_divisible_by=spec.make_vocab_size_divisible_by)
    return (model.cuda() if CUDA else model).eval(), spec


def rel_rms(x: torch.Tensor, ref: torch.Tensor) -> float:
    d = x.double() - ref.double()
    return (d.norm() / ref.double().norm()).item()


@torch.inference_mode()
def full_logits(model, tokens: torch.Tensor, vocab: int) -> torch.Tensor:
    T = tokens.shape[1]
    return model(tokens, torch.arange(T, device=tokens.device).expand_as(tokens), attention_mask=None)[..., :vocab]


def measure(section: dict, *, batch: int = 1, seq: int = 512, steps: int = 8, seed: int = 0,
            generation: bool = True) -> dict:
    """Relative RMS errors of the bf16 logits vs the fp32 logits of the same (bf16-rounded) weights, with the
    residual stream in bf16 (``bf16_residual``) and in fp32 (``fp32_residual``): ``full_forward`` over ``batch`` x
    ``seq`` random tokens, and with ``generation`` the decode path's ``steps`` logits (prefill ``seq - steps + 1``
    tokens, ``steps - 1`` teacher-forced steps) vs the fp32 full forward. Megatron's model-parallel groups must
    exist (``megatron_based.initialize_parallel(1)``). Every model runs on the default ``based_kernels`` backend
    (PyTorch on CPU)."""
    from megatron_based.inference.generation import (Generator, at_decode_positions, decode_error_report,
                                                     teacher_forced_logits)

    if not 1 <= steps <= seq:
        raise ValueError(f"need 1 <= steps ({steps}) <= seq ({seq})")
    torch.manual_seed(seed)
    models = {"fp32_residual": build(section, torch.bfloat16, True)[0]}
    spec = None
    for name, dtype, res in (("bf16_residual", torch.bfloat16, False), ("reference", torch.float32, False)):
        models[name], spec = build(section, dtype, res, initialize=False)
        with torch.no_grad():  # the same (bf16-rounded) weights everywhere
            for p, src in zip(models[name].parameters(), models["fp32_residual"].parameters(), strict=True):
                p.copy_(src)
    assert models["fp32_residual"].config.fp32_residual_connection
    assert not models["bf16_residual"].config.fp32_residual_connection
    vocab = spec.vocab_size
    g = torch.Generator().manual_seed(seed + 1)
    tokens = torch.randint(0, vocab, (batch, seq), generator=g).to(models["reference"].embedding.word_embeddings
                                                                    .weight.device)
    t0 = time.perf_counter()
    full = {name: full_logits(m, tokens, vocab) for name, m in models.items()}
    ref = full["reference"]
    out = {"pattern": section["layer_pattern"], "num_layers": len(section["layer_pattern"]),
           "hidden_size": section["hidden_size"], "batch": batch, "seq": seq,
           "full_forward": {name: rel_rms(full[name], ref) for name in ("bf16_residual", "fp32_residual")}}
    if generation:
        P = seq - steps + 1
        prompts = [P] * batch
        ref_at = at_decode_positions(ref, prompts, steps)
        out["generation"] = {"prompt_length": P, "decode_steps": steps - 1, "logits": steps}
        for name in ("bf16_residual", "fp32_residual"):
            gen = Generator(models[name], vocab_size=vocab, max_length=seq)
            decode = teacher_forced_logits(gen, tokens, prompts, steps)
            gen.release()
            report = decode_error_report(decode, at_decode_positions(full[name], prompts, steps), ref_at)
            out["generation"][name] = {k: report[k] for k in ("decode_rel_rms", "full_forward_rel_rms", "passed")}
    out["seconds"] = round(time.perf_counter() - t0, 1)
    return out


def gpu_step_times(args) -> int:
    """``--gpu``: based-360m training steps at T2048 with the residual in fp32 and in bf16 (the harness of
    benchmarks/train_throughput.py); ``--smoke`` runs its tiny CPU sizes instead (a check of this code path)."""
    if not CUDA and not args.smoke:
        raise SystemExit("--gpu times training steps on a GPU; use --gpu --smoke for a CPU check of this path")
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import train_throughput

    base = "tiny" if args.smoke else args.config
    for res in (True, False):
        train_throughput.BASELINES[f"{base}+res{'32' if res else '16'}"] = {
            **model_section(base), "fp32_residual_connection": res}
    out = args.out or str(ROOT / "benchmarks" / "results" / "residual_precision_gpu.json")
    argv = ["--models", f"{base}+res32", f"{base}+res16", "--out", out]
    argv += ["--smoke", "--seq", "64", "--profile-steps", "1"] if args.smoke else ["--seq", str(args.gpu_seq)]
    argv += ["--cuda-graphs"] if args.cuda_graphs else []
    return train_throughput.main(argv) or 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default="based-360m", help="configs/<name>.yaml's model section (default based-360m)")
    p.add_argument("--layers", type=int, help="only the first N layers of the pattern (CPU time); default all")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--seq", type=int, default=512)
    p.add_argument("--steps", type=int, default=8, help="generation: logits compared (1 prefill + steps-1 decode)")
    p.add_argument("--no-gpt", dest="gpt", action="store_false", help="skip the same-size GPT ('A' x layers)")
    p.add_argument("--no-generation", dest="generation", action="store_false")
    p.add_argument("--per-mixer", action="store_true", help="also each mixer of the pattern alone ('C' x layers, "
                                                           "...; full forward only): where the bf16 error comes from")
    p.add_argument("--gpu", action="store_true", help="time training steps with / without fp32 residual (GPU)")
    p.add_argument("--gpu-seq", type=int, default=2048)
    p.add_argument("--cuda-graphs", action="store_true", help="with --gpu: Megatron's per-layer CUDA graphs "
                                                               "(cuda_graph_impl: local), captured with fp32 inputs")
    p.add_argument("--smoke", action="store_true", help="with --gpu: tiny models on CPU (checks the code path)")
    p.add_argument("--out", help="JSON output (default benchmarks/results/residual_precision.json, "
                                 "residual_precision_gpu.json with --gpu)")
    args = p.parse_args(argv)
    if args.gpu:
        return gpu_step_times(args)

    from megatron_based.runtime.parallel import initialize_parallel

    initialize_parallel(1)
    section = model_section(args.config, args.layers)
    n = len(section["layer_pattern"])
    cases = {"based": section}
    if args.gpt:
        cases["gpt"] = {**section, "layer_pattern": "A" * n}
    if args.per_mixer:
        for sym in dict.fromkeys(section["layer_pattern"]):
            cases[f"only-{sym}"] = {**section, "layer_pattern": sym * n}
    doc = {"meta": {"date": str(date.today()), "device": torch.cuda.get_device_name() if CUDA else "cpu",
                    "torch": torch.__version__, "config": args.config, "layers": n, "reference": "fp32",
                    "metric": "relative RMS error of the logits vs fp32, same bf16-rounded weights"},
           "results": {}}
    out = args.out or str(ROOT / "benchmarks" / "results" / "residual_precision.json")
    for name, sec in cases.items():
        r = measure(sec, batch=args.batch, seq=args.seq, steps=args.steps,
                    generation=args.generation and not name.startswith("only-"))
        doc["results"][name] = r
        print(json.dumps({name: r}), flush=True)
        os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
        with open(out, "w") as fh:
            json.dump(doc, fh, indent=1)
    print(f"\n| model | layers | B x T | full forward: bf16 residual | fp32 residual | generation: bf16 residual "
          f"| fp32 residual |\n|---|---|---|---|---|---|---|")
    for name, r in doc["results"].items():
        g = r.get("generation", {})
        gen = [f"{g[k]['decode_rel_rms']:.2e}" if k in g else "-" for k in ("bf16_residual", "fp32_residual")]
        print(f"| {name} | {r['num_layers']} | {r['batch']} x {r['seq']} | {r['full_forward']['bf16_residual']:.2e} "
              f"| {r['full_forward']['fp32_residual']:.2e} | {gen[0]} | {gen[1]} |")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
