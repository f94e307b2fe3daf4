"""Context parallelism on 2 GPUs with NCCL in bf16 (issue 6; device kind ``nvidia-h200-x2``).

Per mixer at BASED-360m head shapes: the CP=2 result (Triton kernels, bf16) against the fp32 single-rank op on the
full sequence, forward and every input gradient, on both ranks. Criterion: CP may not add error beyond what bf16
already costs on one rank: ``err(CP bf16) <= 2 * err(single-rank bf16) + 2e-3`` (relative max error vs fp32).

Run: ``pytest -m multigpu tests/megatron_based/test_context_parallel_gpu.py`` (launches torchrun with 2 processes),
or directly ``torchrun --nproc_per_node 2 tests/megatron_based/test_context_parallel_gpu.py``.
"""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

pytestmark = pytest.mark.multigpu


def test_cp2_nccl_bf16_parity():
    repo = Path(__file__).resolve().parents[2]
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", __file__],
                          cwd=repo, env=env, capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-6000:]
    assert "CP parity OK" in proc.stdout


def _cases(group, T_local=2048):
    import based_kernels
    from megatron_based.model.mixers.base_conv.context_parallel import base_conv_cp
    from megatron_based.model.mixers.sliding_window.context_parallel import sliding_window_attention_cp
    from megatron_based.model.mixers.softmax_attention.context_parallel import softmax_attention_cp
    from megatron_based.model.mixers.taylor.context_parallel import taylor_attention_cp

    P = group.size()
    T, H, f, dh = P * T_local, 16, 16, 64
    g = torch.Generator().manual_seed(0)
    rnd = lambda *s, scale=1.0: torch.randn(*s, generator=g) * scale  # noqa: E731
    taylor = [(rnd(1, T, H, f, scale=0.5), 1), (rnd(1, T, H, f, scale=0.5), 1), (rnd(1, T, H, dh), 1)]
    swa = lambda n: [(rnd(1, n, H, dh), 1) for _ in range(3)]  # noqa: E731
    conv = [(rnd(1, T, 2048), 1), (rnd(1, T, 2048), 1), (rnd(2048, 3, scale=0.5), None)]
    soft = [(rnd(1, H, T, dh), 2) for _ in range(3)]
    return [
        ("L", lambda q, k, v: taylor_attention_cp(q, k, v, eps=1e-6, cp_group=group),
         lambda q, k, v: based_kernels.taylor_linear_attention(q, k, v, eps=1e-6)[0], taylor),
        ("S W=128", lambda q, k, v: sliding_window_attention_cp(q, k, v, window=128, cp_group=group),
         lambda q, k, v: based_kernels.sliding_window_attention(q, k, v, window=128), swa(T)),
        ("S W>L", lambda q, k, v: sliding_window_attention_cp(q, k, v, window=128, cp_group=group),
         lambda q, k, v: based_kernels.sliding_window_attention(q, k, v, window=128), swa(P * 100)),
        ("C", lambda u1, u2, w: base_conv_cp(u1, u2, w, cp_group=group),
         lambda u1, u2, w: based_kernels.base_conv(u1, u2, w)[0], conv),
        ("A", lambda q, k, v: softmax_attention_cp(q, k, v, scale=None, cp_group=group),
         lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=True), soft),
    ]


def _run(fn, inputs, dy, dtype, r, P):
    """Forward + backward of ``fn`` on this rank's shard (or the full sequence when P == 1) in ``dtype``."""
    xs = []
    for t, d in inputs:
        if d is not None and P > 1:
            t = t.narrow(d, r * (t.shape[d] // P), t.shape[d] // P)
        xs.append(t.to("cuda", dtype).detach().requires_grad_())
    y = fn(*xs)
    y.backward(dy.to(y.dtype))
    return [y.detach().float()] + [x.grad.float() for x in xs]


def main():
    import torch.distributed as dist
    from megatron.core import parallel_state

    from megatron_based.runtime.parallel import initialize_parallel

    initialize_parallel(1, 1, 2, backend="nccl")
    group = parallel_state.get_context_parallel_group()
    r, P = group.rank(), group.size()
    failures = []
    for name, cp_fn, ref_fn, inputs in _cases(group):
        ydim = inputs[0][1]
        full_out = ref_fn(*[t.cuda() for t, _ in inputs])
        dy = torch.randn(full_out.shape, generator=torch.Generator().manual_seed(1)).cuda()
        shard = lambda t, d: t.narrow(d, r * (t.shape[d] // P), t.shape[d] // P)  # noqa: E731
        ref = _run(ref_fn, inputs, dy, torch.float32, r, 1)  # fp32, one rank, full sequence
        one = _run(ref_fn, inputs, dy, torch.bfloat16, r, 1)  # bf16, one rank, full sequence
        got = _run(cp_fn, inputs, shard(dy, ydim), torch.bfloat16, r, P)
        dims = [ydim] + [d for _, d in inputs]
        for i, (g, o, e, d) in enumerate(zip(got, one, ref, dims)):
            if d is None:  # a weight gradient: partial per rank
                dist.all_reduce(g, group=group)
            else:
                o, e = shard(o, d), shard(e, d)
            scale = e.abs().max()
            err_cp, err_one = ((g - e).abs().max() / scale).item(), ((o - e).abs().max() / scale).item()
            what = "y" if i == 0 else f"grad {i - 1}"
            print(f"rank {r} {name:8s} {what:7s} err cp {err_cp:.2e}  err single-rank bf16 {err_one:.2e}")
            if not err_cp <= 2 * err_one + 2e-3:
                failures.append(f"rank {r} {name} {what}: {err_cp:.2e} vs single-rank bf16 {err_one:.2e}")
    results = [None] * P
    dist.all_gather_object(results, failures, group=group)
    dist.destroy_process_group()
    failures = [f for rank_failures in results for f in rank_failures]
    if failures:
        raise SystemExit("CP parity FAILED:\n" + "\n".join(failures))
    print("CP parity OK")


if __name__ == "__main__":
    main()
