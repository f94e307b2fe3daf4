"""Vocab-parallel cross entropy on the GPU at based-360m's LM-head shape (32k tokens x 50264, bf16 logits):
based_kernels.cross_entropy (out-of-place and in-place backward) vs Megatron's fused "native" CE
(torch.compile'd, what cross_entropy_fusion_impl="native" runs) vs F.cross_entropy(logits.float()).
Per implementation: fwd and fwd+bwd ms (median, do_bench), peak extra memory of one fwd+bwd over the inputs,
and the loss / logits-gradient error against fp32 F.cross_entropy. Prints one JSON line per implementation.

    python benchmarks/cross_entropy.py --out benchmarks/results/cross_entropy.json
"""
from __future__ import annotations

import argparse
import json
import socket
import time

import torch
import torch.distributed as dist
import torch.nn.functional as F
import triton

from based_kernels.cross_entropy import vocab_parallel_cross_entropy

GIB = 2 ** 30


def rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def one_rank_group():
    """Megatron's fused CE all-reduces over its TP group even at TP=1 (as in training): a 1-process NCCL group."""
    if not dist.is_initialized():
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        dist.init_process_group("nccl", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    return dist.group.WORLD


def impls(names):
    out = {}
    if "ours" in names:
        out["ours"] = lambda x, t: vocab_parallel_cross_entropy(x, t)
    if "ours_inplace" in names:
        out["ours_inplace"] = lambda x, t: vocab_parallel_cross_entropy(x, t, inplace_backward=True)
    if "megatron_native" in names:
        from megatron.core.fusions.fused_cross_entropy import fused_vocab_parallel_cross_entropy

        group = one_rank_group()
        out["megatron_native"] = lambda x, t: fused_vocab_parallel_cross_entropy(x, t, group)
    if "torch_fp32" in names:
        out["torch_fp32"] = lambda x, t: F.cross_entropy(x.float(), t, reduction="none")
    return out


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--tokens", type=int, default=32768)
    p.add_argument("--vocab", type=int, default=50264, help="V per rank (25132 = based-360m at TP=2)")
    p.add_argument("--impls", nargs="+", default=["ours", "ours_inplace", "megatron_native", "torch_fp32"])
    p.add_argument("--out", default="benchmarks/results/cross_entropy.json")
    args = p.parse_args()
    N, V = args.tokens, args.vocab
    g = torch.Generator(device="cuda").manual_seed(0)
    x0 = (torch.randn(N, V, device="cuda", generator=g) * 4).to(torch.bfloat16)
    t = torch.randint(0, V, (N,), device="cuda", generator=g)
    dloss = torch.rand(N, device="cuda", generator=g) / N
    xf = x0.float().requires_grad_()
    loss_ref = F.cross_entropy(xf, t, reduction="none")
    (grad_ref,) = torch.autograd.grad(loss_ref, xf, dloss)
    loss_ref, grad_ref = loss_ref.detach(), grad_ref.to(torch.bfloat16)  # keep 3.3 GB, not 6.6, for the errors
    del xf
    meta = dict(device=torch.cuda.get_device_name(), torch=torch.__version__, triton=triton.__version__,
                tokens=N, vocab=V, dtype="bfloat16", logits_gib=round(x0.numel() * 2 / GIB, 3))
    print(json.dumps(meta), flush=True)
    rows = []
    for name, fn in impls(args.impls).items():
        row = dict(impl=name)
        try:
            x = x0.clone().requires_grad_()
            t0 = time.perf_counter()
            loss = fn(x, t)
            (grad,) = torch.autograd.grad(loss, x, dloss)
            torch.cuda.synchronize()
            row["first_call_s"] = round(time.perf_counter() - t0, 2)  # autotuning / torch.compile
            row["loss_max_abs_err"] = (loss.float() - loss_ref).abs().max().item()
            row["grad_rel_err"] = rel(grad.float(), grad_ref.float())
            row["grad_dtype"] = str(grad.dtype)
            del loss, grad
            x.data.copy_(x0)
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
            loss = fn(x, t)
            row["fwd_peak_extra_gib"] = round((torch.cuda.max_memory_allocated() - base) / GIB, 3)
            (grad,) = torch.autograd.grad(loss, x, dloss)
            row["fwdbwd_peak_extra_gib"] = round((torch.cuda.max_memory_allocated() - base) / GIB, 3)
            del loss, grad
            with torch.no_grad():
                row["fwd_ms"] = round(triton.testing.do_bench(lambda: fn(x, t), warmup=10, rep=50,
                                                              return_mode="median"), 4)
            # (the in-place variant then runs on its own earlier gradients: same work, values do not matter)
            row["fwdbwd_ms"] = round(triton.testing.do_bench(
                lambda: torch.autograd.grad(fn(x, t), x, dloss), warmup=10, rep=50, return_mode="median"), 4)
            # the least traffic of any fwd+bwd: read the bf16 logits twice, write the bf16 gradient once
            row["fwdbwd_eff_TBps"] = round(6 * x0.numel() / row["fwdbwd_ms"] / 1e9, 3)
        except Exception as e:  # noqa: BLE001 - one failing implementation must not stop the others
            row["error"] = f"{type(e).__name__}: {e}"[:500]
        finally:
            x = None
            torch.cuda.empty_cache()
        print(json.dumps(row), flush=True)
        rows.append(row)
    with open(args.out, "w") as fh:
        json.dump(dict(meta=meta, rows=rows), fh, indent=1)
    print(f"{'impl':16} {'fwd ms':>8} {'fwd+bwd ms':>11} {'peak GiB':>9} {'loss err':>9} {'grad rel':>9}")
    for r in rows:
        if "error" in r:
            print(f"{r['impl']:16} FAILED {r['error'][:100]}")
        else:
            print(f"{r['impl']:16} {r['fwd_ms']:8.3f} {r['fwdbwd_ms']:11.3f} {r['fwdbwd_peak_extra_gib']:9.2f} "
                  f"{r['loss_max_abs_err']:9.1e} {r['grad_rel_err']:9.1e}")
    if dist.is_initialized():
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
