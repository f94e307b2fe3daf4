"""Taylor linear attention on the GPU: correctness vs fp64, then forward and forward+backward timings against
fla ``parallel_based`` / ``fused_chunk_based`` and FlashAttention-2 (SDPA flash backend), B*T = 32k tokens.

    python benchmarks/taylor_attention.py [--sweep] [--quick] [--out benchmarks/results/taylor_attention.json]

One process: (1) correctness of our kernels (bf16, fp64 reference on upcast inputs); (2) the two ceilings
(device copy, bf16 matmul); (3) optionally a sweep of kernel configurations at the goal shape, keeping the
fastest; (4) the table. JSON is rewritten after every row, so a run cut short still leaves its numbers.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import sys
import traceback

import torch
import triton
from triton.testing import do_bench

from based_kernels.taylor_attention import ops, taylor_attention_chunked, taylor_linear_attention

H, F, TOKENS = 16, 16, 32768
TS = [2048, 4096, 8192, 16384, 32768, 65536]
QUICK_TS = [2048, 4096, 8192, 32768]  # --quick: and one 32k sequence (batch 1: the state passes' two-level walk)
DVS = [64, 128]
CHUNK = 64
# The launch configurations the sweep times, (BF feature block, BV value block, num_warps, num_stages) per pass (the
# gradient pass's each as one kernel and split, ops.GRAD_SPLIT); benchmarks/aot_check.py compiles the same ones for
# sm_90 on CPU (registers, spills). The symmetric map's 153 rows: BF 64 -> 3 feature blocks, 128 -> 2, 32 -> 5. At
# chunk 128 every output / state configuration at 4 warps spills (aot_check: the default output (64, 64, 4) 1436 B
# per thread, state (64, 64, 4) 1124 B); (64, 32, 8), (32, 64, 8) for the output and (32, 64, 8) for the state
# compile without.
CANDIDATES = {"state": [(64, 64, 4, 2), (64, 64, 8, 2), (32, 64, 4, 2), (128, 64, 8, 2), (32, 64, 8, 2)],
              "output": [(64, 64, 4, 2), (64, 64, 8, 2), (128, 64, 8, 2), (64, 32, 8, 2), (32, 64, 8, 2)],
              "grad": [(64, 64, 8, 1), (32, 64, 8, 1), (64, 64, 4, 1), (32, 64, 4, 1), (32, 32, 8, 1),
                       (32, 32, 4, 1)],
              # the output pass's state part (ops.OUTPUT_SPLIT)
              "state_part": [(32, 64, 4, 1), (32, 64, 4, 2), (32, 64, 2, 1), (16, 64, 4, 1), (64, 64, 4, 1)],
              # the gradient pass's state terms (ops.GRAD_STATE_SPLIT, timed with it on)
              "grad_state": [(32, 64, 4, 1), (32, 64, 8, 1), (16, 64, 4, 1), (32, 64, 4, 2)]}
# ops.STATE_GROUP_PROGRAMS_PER_SM candidates (the state passes' two-level walk; the shipped value first)
STATE_GROUPS = [4, 0, 2, 8]


def rel(a, b):
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm()).item()


def ms(fn, budget_ms=300):
    return do_bench(fn, warmup=25, rep=budget_ms, return_mode="median")


def inputs(B, T, dv, seed=0, grad=False, qk_dim=F):
    g = torch.Generator(device="cuda").manual_seed(seed)
    mk = lambda *s: torch.randn(*s, device="cuda", generator=g, dtype=torch.bfloat16).requires_grad_(grad)  # noqa
    return mk(B, T, H, qk_dim), mk(B, T, H, qk_dim), mk(B, T, H, dv)


# ----------------------------------------------------------------------------------------------- models
def flops_bytes(B, T, dv, kind):
    """Roofline floor counts of docs/performance.md (per token-head: D = 1 + f + f(f+1)/2 features, chunk 64, phi and
    per-chunk states never in HBM; our kernels do move the per-chunk states, so TB/s here is of the floor's
    bytes)."""
    D, n = 1 + F + F * (F + 1) // 2, B * T * H
    fwd_f = (4 * D * dv + 2 * CHUNK * (F + dv)) * n
    fwd_b = (2 * 2 * F + 2 * 2 * dv + 4) * n  # q, k, v, o in bf16 + fp32 denominator
    if kind == "fwd":
        return fwd_f, fwd_b
    bwd_f = (10 * D * dv + 4 * CHUNK * (F + dv)) * n
    bwd_b = (2 * 2 * F + 3 * 2 * dv + 4 + 2 * 2 * F + 2 * dv + 4) * n  # read q,k,v,o,dy,den; write dq,dk,dv; dd
    return fwd_f + bwd_f, fwd_b + bwd_b


def fa_flops(B, T, d, kind):
    f = 4 * B * H * T * T * d / 2  # causal
    return f if kind == "fwd" else 3.5 * f


# ----------------------------------------------------------------------------------------------- peers
def peers():
    out = {}
    try:
        from fla.ops.based import fused_chunk_based, parallel_based
        out["fla_parallel_based"] = lambda q, k, v: parallel_based(q, k, v)
        out["fla_fused_chunk_based"] = lambda q, k, v: fused_chunk_based(q, k, v)
    except Exception as e:  # noqa: BLE001
        print("fla not available:", e)
    from torch.nn.attention import SDPBackend, sdpa_kernel

    def fa2(q, k, v):  # softmax attention, head dim d_v for q, k and v; [B, T, H, d] viewed as [B, H, T, d]
        with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
            o = torch.nn.functional.scaled_dot_product_attention(
                q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True)
        return o.transpose(1, 2)
    fa2.qk_dim_is_dv = True

    out["fa2_sdpa"] = fa2
    return out


def ours(q, k, v):
    return taylor_linear_attention(q, k, v)[0]


# ----------------------------------------------------------------------------------------------- steps
def errors_vs_fp64(B, T, dv, cu=None):
    """Our kernels' output, final state and gradients at one shape (bf16, seed 1) against the fp64 chunked
    reference: ``({"y", "S_final", "dq", "dk", "dv": relative error}, (q, k, v), fp64 output)``."""
    q, k, v = inputs(B, T, dv, seed=1, grad=True)
    cu_t = None if cu is None else torch.tensor(cu, device="cuda", dtype=torch.int32)
    y, fin = taylor_linear_attention(q, k, v, cu_seqlens=cu_t, output_final_state=True)
    dy = torch.randn_like(y)
    y.backward(dy)
    got = [y, fin[0], q.grad, k.grad, v.grad]
    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    y64, fin64 = taylor_attention_chunked(q64, k64, v64, cu_seqlens=cu_t, output_final_state=True)
    y64.backward(dy.double())
    want = [y64, fin64[0], q64.grad, k64.grad, v64.grad]
    return dict(zip(["y", "S_final", "dq", "dk", "dv"], (rel(a, b) for a, b in zip(got, want)))), (q, k, v), y64


def correctness():
    res = {}
    cases = [("B2 T2048 dv64", 2, 2048, 64, None), ("B1 T4096 dv128", 1, 4096, 128, None),
             ("varlen 3 docs dv64", 1, 3000, 64, [0, 1, 1200, 3000])]
    for name, B, T, dv, cu in cases:
        errs, (q, k, v), y64 = errors_vs_fp64(B, T, dv, cu)
        if cu is None:
            fla = peers().get("fla_parallel_based")
            if fla is not None:
                errs["fla_parallel_based_y"] = rel(fla(q.detach(), k.detach(), v.detach()), y64)
        res[name] = errs
        print(f"correctness {name}: " + ", ".join(f"{k_}={e:.2e}" for k_, e in errs.items()), flush=True)
    return res


def ceilings():
    x = torch.randn(2 ** 28, device="cuda", dtype=torch.bfloat16)
    y = torch.empty_like(x)
    t = ms(lambda: y.copy_(x), 200)
    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    tm = ms(lambda: a @ b, 300)
    c = {"copy_TBps": 2 * x.numel() * 2 / t / 1e9, "bf16_matmul_TFLOPs": 2 * 8192 ** 3 / tm / 1e9}
    print(f"ceilings: copy {c['copy_TBps']:.2f} TB/s, bf16 matmul {c['bf16_matmul_TFLOPs']:.0f} TFLOP/s", flush=True)
    del x, y, a, b
    return c


def time_case(fn, B, T, dv, kind, budget_ms=300):
    qk_dim = dv if getattr(fn, "qk_dim_is_dv", False) else F
    q, k, v = inputs(B, T, dv, grad=(kind == "fwdbwd"), qk_dim=qk_dim)
    if kind == "fwd":
        with torch.no_grad():
            return ms(lambda: fn(q, k, v), budget_ms)
    dy = torch.randn(B, T, H, dv, device="cuda", dtype=torch.bfloat16)

    def step():
        q.grad = k.grad = v.grad = None
        fn(q, k, v).backward(dy)
    return ms(step, budget_ms)


def _try(label, fn, *a):
    try:
        return fn(*a)
    except Exception as e:  # noqa: BLE001
        print(label, "failed:", repr(e)[:300], flush=True)
        return None


def checked(chunk, grad, split):
    """Whether a launch configuration passes benchmarks/taylor_config_check.py (forward and backward against fp64) in
    a process of its own: some crash with an illegal memory access (chunk 64 with the one-kernel gradient pass at 8
    warps, on an H100), which would end every later measurement of this process."""
    import subprocess

    cmd = [sys.executable, os.path.join(os.path.dirname(os.path.abspath(__file__)), "taylor_config_check.py"),
           "--chunk", str(chunk), "--grad", *map(str, grad)] + (["--split"] if split else [])
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    except subprocess.TimeoutExpired:
        print(f"check chunk {chunk} grad {grad} split {split}: timed out", flush=True)
        return False
    print((done.stdout.strip().splitlines() or [f"check exited {done.returncode}"])[-1], flush=True)
    return done.returncode == 0


def run_grad_tiles(grad):
    """The gradient tiles the library runs for ``CONFIG["grad"] = grad`` at ops.CHUNK and ops.GRAD_SPLIT (d_v 64)."""
    return (grad[0], grad[1], ops.grad_warps(ops.CHUNK, grad[2], ops.grad_split(grad[1])), grad[3])


def sweep_switch(out, attr, kind, budget_ms, B, T, dv, first=True):
    """Times ``ops.<attr>`` at ``first``, then at the other value (``kind``: "fwd" or "fwdbwd"), records both in
    ``out`` ("<attr lowercase> True" / "False") and keeps the faster (``first`` where neither ran; on a tie too)."""
    key = attr.lower()
    order = (first, not first)
    for value in order:
        setattr(ops, attr, value)
        out[f"{key} {value}"] = _try(f"{key} {value}", time_case, ours, B, T, dv, kind, budget_ms)
        print(f"sweep {key} {value} ({kind}): {out[f'{key} {value}']} ms", flush=True)
    timed = [v for v in order if out[f"{key} {v}"] is not None]
    setattr(ops, attr, min(timed, key=lambda v: out[f"{key} {v}"]) if timed else first)


def sweep(results, save):
    """Time kernel configurations at B8 T4096 H16 d_v 64 (and the state pass at B1 T32768, where it has the
    fewest programs) and keep the fastest for the rest of the run. Each pass is swept on its own; a chunk or gradient
    configuration is timed only after it passed its check in a separate process (``checked``)."""
    B, T, dv = TOKENS // 4096, 4096, 64
    out = {}
    for chunk in (64, 128):
        ops.CHUNK = chunk
        grad = run_grad_tiles(ops.CONFIG["grad"])  # the library's: below chunk 128 at 4 warps at most
        if not checked(chunk, grad, ops.GRAD_SPLIT):
            out[f"chunk{chunk}_fwdbwd"] = None
            continue
        out[f"chunk{chunk}_fwdbwd"] = _try(f"chunk {chunk}", time_case, ours, B, T, dv, "fwdbwd", 150)
        print(f"sweep chunk {chunk} (gradient tiles {grad}): fwd+bwd {out[f'chunk{chunk}_fwdbwd']} ms", flush=True)
    ops.CHUNK = min((c for c in (64, 128) if out[f"chunk{c}_fwdbwd"]), key=lambda c: out[f"chunk{c}_fwdbwd"])
    # the gradient pass's 5th entry: ops.GRAD_SPLIT (dq and dk / dv in two kernels)
    cands = {**CANDIDATES, "grad": [(*c, split) for split in (False, True) for c in CANDIDATES["grad"]]}
    for name, cfgs in cands.items():
        kind = "fwdbwd" if name in ("grad", "grad_state") else "fwd"
        ops.GRAD_STATE_SPLIT = name == "grad_state"
        best = None
        for cfg in cfgs:
            ops.CONFIG[name] = cfg[:4]
            if name == "grad":
                ops.GRAD_SPLIT = cfg[4]
                runs = (*run_grad_tiles(cfg[:4]), ops.grad_split(cfg[1]))
                if runs != cfg:  # the library runs another candidate's tiles instead
                    out[f"{name} {cfg}"] = None
                    print(f"sweep {name} {cfg}: runs as {runs} at chunk {ops.CHUNK} (ops.grad_warps, "
                          "ops.grad_split), not timed", flush=True)
                    continue
                if not checked(ops.CHUNK, cfg[:4], cfg[4]):
                    out[f"{name} {cfg}"] = None
                    continue
            t = _try(f"{name} {cfg}", time_case, ours, B, T, dv, kind, 120)
            out[f"{name} {cfg}"] = t
            print(f"sweep {name} {cfg} ({kind}): {t} ms", flush=True)
            if t is not None and (best is None or t < best[1]):
                best = (cfg, t)
        ops.CONFIG[name] = best[0][:4]
        if name == "grad":
            ops.GRAD_SPLIT = best[0][4]
    # the gradient pass's state terms as their own kernel (at the tiles kept above) or not
    sweep_switch(out, "GRAD_STATE_SPLIT", "fwdbwd", 120, B, T, dv, first=False)
    # the output pass as two kernels (its state part at the tiles kept above) or one
    sweep_switch(out, "OUTPUT_SPLIT", "fwd", 120, B, T, dv)
    # the forward's per-chunk states kept for the backward, or recomputed there by a second state pass
    sweep_switch(out, "KEEP_STATES", "fwdbwd", 150, B, T, dv)
    # the state passes' two-level walk, at the sweep's shape and at one long sequence: the smallest sum of the two kept
    totals = {}
    for p in STATE_GROUPS:
        ops.STATE_GROUP_PROGRAMS_PER_SM = p
        times = [_try(f"state groups {p}", time_case, ours, b, t, dv, "fwdbwd", 120) for b, t in ((B, T), (1, TOKENS))]
        out[f"state_groups {p}"] = times
        print(f"sweep state groups up to {p} programs per SM (fwdbwd B{B} T{T}, B1 T{TOKENS}): {times} ms", flush=True)
        if None not in times:
            totals[p] = sum(times)
    ops.STATE_GROUP_PROGRAMS_PER_SM = min(totals, key=totals.get) if totals else STATE_GROUPS[0]
    out["chosen"] = {"CHUNK": ops.CHUNK, "CONFIG": dict(ops.CONFIG), "GRAD_SPLIT": ops.GRAD_SPLIT,
                     "OUTPUT_SPLIT": ops.OUTPUT_SPLIT, "GRAD_STATE_SPLIT": ops.GRAD_STATE_SPLIT,
                     "KEEP_STATES": ops.KEEP_STATES,
                     "STATE_GROUP_PROGRAMS_PER_SM": ops.STATE_GROUP_PROGRAMS_PER_SM}
    print("chosen:", out["chosen"], flush=True)
    results["sweep"] = out
    save()


def breakdown(results, save):
    """GPU time of each pass at B8 T4096 and B1 T32768 (d_v 64): where the time goes."""
    res = {}
    for B, T in ((TOKENS // 4096, 4096), (1, 32768)):
        dv = 64
        q, k, v = inputs(B, T, dv)
        dy = torch.randn_like(v)
        BT = ops._cfg("output", F, dv)[1]
        n, NC, off, meta = ops._chunks(B, T, None, BT)
        o, den = ops._fwd(q, k, v, None, None, None, 1e-12, False)[:2]
        dd = torch.randn_like(den)
        r = {"state_pass": ms(lambda: ops._state_pass(k, v, None, None, None, None, None, n, NC, off, False, False)),
             "forward_total": ms(lambda: ops._fwd(q, k, v, None, None, None, 1e-12, False)),
             "dstate_pass": ms(lambda: ops._state_pass(q, dy, den, dd, None, None, None, n, NC, off, False, True)),
             "backward_total": ms(lambda: ops._bwd(q, k, v, o, den, dy, None, None, None, None, None))}
        r["output_pass"] = r["forward_total"] - r["state_pass"]
        r["grad_pass_and_prep"] = r["backward_total"] - 2 * r["state_pass"] - r["dstate_pass"]
        res[f"B{B} T{T}"] = r
        print(f"breakdown B{B} T{T}: " + ", ".join(f"{k_} {t:.3f}" for k_, t in r.items()), flush=True)
    results["breakdown_ms"] = res
    save()


def table(results, save, quick, dvs=DVS):
    cl = results["ceilings"]
    rows = results.setdefault("rows", [])
    fns = {"ours": ours, **peers()}
    for dv in dvs:
        for T in (QUICK_TS if quick else TS):
            B = max(1, TOKENS // T)
            for kind in ("fwd", "fwdbwd"):
                row = {"dv": dv, "T": T, "B": B, "kind": kind}
                for name, fn in fns.items():
                    try:
                        row[name] = time_case(fn, B, T, dv, kind, 200 if name == "ours" else 100)
                    except Exception as e:  # noqa: BLE001
                        row[name] = None
                        print(f"{name} dv{dv} T{T} {kind} failed: {repr(e)[:200]}", flush=True)
                    torch.cuda.empty_cache()
                fl, by = flops_bytes(B, T, dv, kind)
                t = row["ours"]
                if t:
                    row["ours_TFLOPs"] = fl / t / 1e9
                    row["ours_TBps"] = by / t / 1e9
                    floor = max(fl / (cl["bf16_matmul_TFLOPs"] * 1e9), by / (cl["copy_TBps"] * 1e9))
                    row["floor_ms"] = floor
                    row["pct_of_floor"] = 100 * floor / t
                    for p in fns:
                        if p != "ours" and row.get(p):
                            row[f"speedup_vs_{p}"] = row[p] / t
                if row.get("fa2_sdpa"):
                    row["fa2_TFLOPs"] = fa_flops(B, T, dv, kind) / row["fa2_sdpa"] / 1e9
                rows.append(row)
                save()
                print(fmt_row(row), flush=True)


def fmt_row(r):
    def f(x, p=3):
        return "-" if x is None else f"{x:.{p}f}"
    return (f"| {r['dv']} | {r['T']} | {r['B']} | {r['kind']} | {f(r.get('ours'))} | {f(r.get('ours_TFLOPs'), 0)} | "
            f"{f(r.get('ours_TBps'), 2)} | {f(r.get('pct_of_floor'), 0)}% | {f(r.get('fla_parallel_based'))} | "
            f"{f(r.get('fla_fused_chunk_based'))} | {f(r.get('fa2_sdpa'))} | "
            f"{f(r.get('speedup_vs_fla_parallel_based'), 2)}x | {f(r.get('speedup_vs_fa2_sdpa'), 2)}x |")


HEADER = ("| d_v | T | B | pass | ours ms | TFLOP/s | TB/s | % of floor | fla parallel ms | fla fused_chunk ms | "
          "FA2 ms | vs parallel | vs FA2 |\n|---|---|---|---|---|---|---|---|---|---|---|---|---|")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="benchmarks/results/taylor_attention.json")
    ap.add_argument("--sweep", action="store_true")
    ap.add_argument("--quick", action="store_true", help="T 2k-8k and 32k only")
    ap.add_argument("--dv", type=int, nargs="+", default=DVS)
    args = ap.parse_args()
    try:
        import fla
        fla_version = getattr(fla, "__version__", "?")
    except Exception:  # noqa: BLE001
        fla_version = None
    results = {"date": datetime.date.today().isoformat(), "gpu": torch.cuda.get_device_name(),
               "torch": torch.__version__, "triton": triton.__version__, "fla": fla_version,
               "python": platform.python_version(), "shape": {"H": H, "f": F, "tokens": TOKENS}}
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)

    def save():
        with open(args.out, "w") as fh:
            json.dump(results, fh, indent=1)
    print(results, flush=True)
    try:
        results["correctness"] = correctness()
    except Exception:  # noqa: BLE001
        traceback.print_exc()
    save()
    results["ceilings"] = ceilings()
    if args.sweep:
        try:
            sweep(results, save)
        except Exception:  # noqa: BLE001
            traceback.print_exc()
    results["config"] = {"CHUNK": ops.CHUNK, "CONFIG": {k: list(v) for k, v in ops.CONFIG.items()},
                         "GRAD_SPLIT": ops.GRAD_SPLIT, "KEEP_STATES": ops.KEEP_STATES,
                         "STATE_GROUP_PROGRAMS_PER_SM": ops.STATE_GROUP_PROGRAMS_PER_SM, "HI_INTRA": ops.HI_INTRA,
                         "HI_BWD": ops.HI_BWD, "OUTPUT_QUERY_ROWS": ops.OUTPUT_QUERY_ROWS,
                         "OUTPUT_SPLIT": ops.OUTPUT_SPLIT}
    save()
    _try("breakdown", breakdown, results, save)
    table(results, save, args.quick, args.dv)
    print(f"\n{results['gpu']}, torch {results['torch']}, triton {results['triton']}, fla {fla_version}, "
          f"{results['date']}; H {H}, f {F}, B*T = {TOKENS}, bf16; median ms (triton.testing.do_bench)")
    print(HEADER)
    for r in results["rows"]:
        print(fmt_row(r))
    return 0


if __name__ == "__main__":
    sys.exit(main())
