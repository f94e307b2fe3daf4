"""Fused RoPE + q/k/v split (based_kernels.rope_split_qkv) vs Megatron's split + two apply_rotary_pos_emb calls
(the unfused path of the S and A mixers, rope_fusion=False) at based-360m's training shape: qkv [8192, 4, 16,
3 * 64] bf16 (MHA), positions 0..8191. Per implementation: fwd and fwd+bwd ms (do_bench median, eager), device
busy ms (profiler) and host ms per call, effective TB/s against the least traffic (read qkv + write q, k, v
forward; read dq, dk, dv + write dqkv backward), and the error of q, k and dqkv against fp64. Also the GQA shape
(4 groups of 4 query heads). Prints a table, writes JSON to --out. Expected runtime on an H100: ~25 s.

    python benchmarks/rope.py --out benchmarks/results/rope.json
"""
from __future__ import annotations

import argparse
import json
import os
import types

import torch
import triton
from megatron.core.models.common.embeddings.rope_utils import apply_rotary_pos_emb

from based_kernels import rope_split_qkv
from bench_utils import GRAPH, bench, rel
from megatron_based.model.rope import rope_freqs

CFG = types.SimpleNamespace(apply_rope_fusion=False, rotary_interleaved=False)  # what BasedConfig passes
NO_CP = object()  # bshd RoPE ignores the CP group; it must only be non-None (else Megatron's global is looked up)


def megatron(qkv, ng, D, freqs=None):
    """SelfAttention.get_query_key_value_tensors' split, then apply_rotary_pos_emb on q and k (freqs computed per
    call as the mixers do, unless given)."""
    s, b, _, W = qkv.shape
    G = W // D - 2
    q, k, v = torch.split(qkv, [G * D, D, D], dim=3)
    q = q.reshape(s, b, ng * G, D)
    if freqs is None:
        freqs = rope_freqs(s, D, 10000.0, 0, device=qkv.device)
    return (apply_rotary_pos_emb(q, freqs, CFG, cp_group=NO_CP), apply_rotary_pos_emb(k, freqs, CFG, cp_group=NO_CP),
            v)


def fused(qkv, ng, D):
    return rope_split_qkv(qkv, ng, D)


def reference(qkv, grads, ng, D):
    """fp64 q, k and dqkv (complex rotation of the pairs (i, i + D/2))."""
    s, b, _, W = qkv.shape
    G = W // D - 2
    inv = 10000.0 ** (-torch.arange(0, D, 2, dtype=torch.float64, device=qkv.device) / D)
    ang = (torch.arange(s, dtype=torch.float64, device=qkv.device)[:, None] * inv)[:, None, None, :]

    def rot(x, sign):
        x = x.double()
        z = torch.complex(x[..., : D // 2], x[..., D // 2:]) * torch.polar(torch.ones_like(ang), sign * ang)
        return torch.cat([z.real, z.imag], dim=-1)

    x = qkv.unflatten(-1, (G + 2, D))
    q = rot(x[:, :, :, :G].reshape(s, b, ng * G, D), 1)
    k = rot(x[:, :, :, G], 1)
    dq, dk, dv = grads
    dx = torch.cat([rot(dq, -1).unflatten(2, (ng, G)), rot(dk, -1)[:, :, :, None], dv.double()[:, :, :, None]], 3)
    return q, k, dx.flatten(3)


def run_case(name, s, b, ng, G, D):
    g = torch.Generator(device="cuda").manual_seed(0)
    qkv = torch.randn(s, b, ng, (G + 2) * D, device="cuda", generator=g).to(torch.bfloat16)
    # gradients as the SWA op returns them: token-major [b, s, h, d] views = contiguous [s, b, h, d]
    grads = tuple(torch.randn(s, b, h, D, device="cuda", generator=g).to(torch.bfloat16) for h in (ng * G, ng, ng))
    ref = reference(qkv, grads, ng, D)
    nbytes = 2 * qkv.numel() * qkv.element_size()  # one direction: read one, write the other
    freqs = rope_freqs(s, D, 10000.0, 0, device="cuda")
    impls = {"fused": lambda x: fused(x, ng, D), "megatron": lambda x: megatron(x, ng, D),
             "megatron_cached_freqs": lambda x: megatron(x, ng, D, freqs)}
    rows = []
    for impl, f in impls.items():
        row = dict(case=name, impl=impl, shape=[s, b, ng, (G + 2) * D])
        try:
            x = qkv.detach().requires_grad_()
            out = f(x)
            (dx,) = torch.autograd.grad(out, x, grads)
            row.update(q_rel=rel(out[0], ref[0]), k_rel=rel(out[1], ref[1]), dqkv_rel=rel(dx, ref[2]),
                       v_exact=bool(torch.equal(out[2], qkv[..., (G + 1) * D:])))
            del out, dx
            with torch.no_grad():
                row["fwd_ms"] = round(bench(lambda: f(qkv), f"{name}_{impl}_fwd"), 4)

            def fwdbwd():
                x = qkv.detach().requires_grad_()
                torch.autograd.grad(f(x), x, grads)

            row["fwdbwd_ms"] = round(bench(fwdbwd, f"{name}_{impl}_fwdbwd"), 4)
            for k in ("fwd", "fwdbwd"):
                row[f"{k}_device_ms"] = GRAPH[f"{name}_{impl}_{k}_device"]
                row[f"{k}_host_ms"] = GRAPH[f"{name}_{impl}_{k}_host"]
            row["fwd_TBps"] = round(nbytes / row["fwd_device_ms"] / 1e9, 3)
            row["fwdbwd_TBps"] = round(2 * nbytes / row["fwdbwd_device_ms"] / 1e9, 3)
        except Exception as e:  # noqa: BLE001 - one failing implementation must not stop the others
            row["error"] = f"{type(e).__name__}: {e}"[:500]
        print(json.dumps(row), flush=True)
        rows.append(row)
    return rows


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default="benchmarks/results/rope.json")
    args = p.parse_args()
    meta = dict(device=torch.cuda.get_device_name(), torch=torch.__version__, triton=triton.__version__,
                dtype="bfloat16")
    print(json.dumps(meta), flush=True)
    rows = []
    for case in (("mha", 8192, 4, 16, 1, 64), ("gqa4", 8192, 4, 4, 4, 64)):
        try:
            rows += run_case(*case)
        except Exception as e:  # noqa: BLE001
            rows.append(dict(case=case[0], error=f"{type(e).__name__}: {e}"[:500]))
            print(f"FAILED case {case[0]}: {e}", flush=True)
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as fh:
        json.dump(dict(meta=meta, rows=rows), fh, indent=1)
    print(f"{'case':5} {'impl':22} {'fwd ms':>7} {'dev':>6} {'host':>6} {'f+b ms':>7} {'dev':>6} {'host':>6} "
          f"{'f+b TB/s':>8} {'q rel':>8} {'dqkv rel':>8}")
    for r in rows:
        if "error" in r:
            print(f"{r.get('case', '?'):5} {r.get('impl', ''):22} FAILED {r['error'][:100]}")
        else:
            print(f"{r['case']:5} {r['impl']:22} {r['fwd_ms']:7.3f} {r['fwd_device_ms']:6.3f} {r['fwd_host_ms']:6.3f} "
                  f"{r['fwdbwd_ms']:7.3f} {r['fwdbwd_device_ms']:6.3f} {r['fwdbwd_host_ms']:6.3f} "
                  f"{r['fwdbwd_TBps']:8.2f} {r['q_rel']:8.1e} {r['dqkv_rel']:8.1e}")


if __name__ == "__main__":
    main()
