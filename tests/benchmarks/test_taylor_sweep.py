"""The Taylor benchmark's sweep (benchmarks/taylor_attention.py --sweep, GPU only) with its GPU parts replaced: it
checks and times the gradient tiles the library runs (ops.grad_warps: the one-kernel pass below chunk 128 at 4 warps
at most; chunk 64 at 8 warps crashes on an H100), and the candidates include the shipped tiles."""
from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))

import taylor_attention as taylor_bench  # noqa: E402


def test_candidates_include_the_shipped_tiles():
    for name, tiles in taylor_bench.ops.CONFIG.items():
        assert tiles in taylor_bench.CANDIDATES[name], name
    assert taylor_bench.STATE_GROUPS[0] == taylor_bench.ops.STATE_GROUP_PROGRAMS_PER_SM  # the shipped value first


@pytest.mark.parametrize("chunk64_faster", [True, False])
def test_sweep_times_only_what_the_library_runs(monkeypatch, chunk64_faster):
    ops = taylor_bench.ops
    monkeypatch.setitem(ops.CONFIG, "grad", (32, 64, 8, 1))
    monkeypatch.setattr(ops, "CHUNK", ops.CHUNK)
    monkeypatch.setattr(ops, "GRAD_SPLIT", False)
    monkeypatch.setattr(ops, "INTERPRET", False)  # the GPU's rules (ops.grad_split); no kernel runs here
    monkeypatch.setattr(ops, "KEEP_STATES", ops.KEEP_STATES)
    monkeypatch.setattr(ops, "STATE_GROUP_PROGRAMS_PER_SM", ops.STATE_GROUP_PROGRAMS_PER_SM)
    monkeypatch.setattr(ops, "OUTPUT_SPLIT", ops.OUTPUT_SPLIT)
    monkeypatch.setattr(ops, "GRAD_STATE_SPLIT", ops.GRAD_STATE_SPLIT)
    for name in ("state", "output", "state_part", "grad_state"):
        monkeypatch.setitem(ops.CONFIG, name, ops.CONFIG[name])
    checks, timed = [], []

    def passes(chunk, grad, split):
        return not (chunk == 64 and grad[2] == 8 and not split)  # what the H100 does

    def checked(chunk, grad, split):
        checks.append((chunk, tuple(grad), split))
        return passes(chunk, grad, split)

    def time_case(fn, B, T, dv, kind, budget_ms=300):
        if B == 1:  # the long sequence of the two-level walk's comparison: the largest value fastest
            return 5.0 - ops.STATE_GROUP_PROGRAMS_PER_SM / 10
        timed.append((ops.CHUNK, taylor_bench.run_grad_tiles(ops.CONFIG["grad"]), ops.GRAD_SPLIT, kind))
        if len(timed) <= 2:  # the chunk comparison
            return 1.0 if (ops.CHUNK == 64) == chunk64_faster else 2.0
        return 3.0 + len(timed) / 100  # later candidates slower: the first of each pass stays

    monkeypatch.setattr(taylor_bench, "checked", checked)
    monkeypatch.setattr(taylor_bench, "time_case", time_case)
    results = {}
    taylor_bench.sweep(results, lambda: None)
    # chunk 64 is checked and timed at the tiles the library runs there (4 warps), chunk 128 at the default
    assert checks[:2] == [(64, (32, 64, 4, 1), False), (128, (32, 64, 8, 1), False)]
    assert timed[:2] == [(64, (32, 64, 4, 1), False, "fwdbwd"), (128, (32, 64, 8, 1), False, "fwdbwd")]
    sweep = results["sweep"]
    assert sweep["chunk64_fwdbwd"] == (1.0 if chunk64_faster else 2.0)
    assert all(t[0] == (64 if chunk64_faster else 128) for t in timed[2:])  # the passes at the chunk kept
    # no check failed: below chunk 128 the one-kernel 8-warp candidates are neither checked nor timed (the library
    # would run their 4-warp twins), nor split ones at 32 value columns (it runs them unsplit: ops.grad_split);
    # the other split candidates, and at chunk 128 the one-kernel ones, are
    assert all(passes(*c) for c in checks)
    grad = {ast.literal_eval(k[len("grad "):]): t for k, t in sweep.items() if k.startswith("grad ")}
    assert len(grad) == 2 * len(taylor_bench.CANDIDATES["grad"])
    assert any(cfg[4] and cfg[1] < 64 for cfg in grad)
    assert all((t is None) == ((chunk64_faster and cfg[2] == 8 and not cfg[4]) or (cfg[4] and cfg[1] < 64))
               for cfg, t in grad.items())
    assert all(t[1][2] == 4 for t in timed if t[0] == 64 and not t[2])
    assert sweep["chosen"]["CHUNK"] == (64 if chunk64_faster else 128)
    # the output pass split and not, forward: the first (split) kept as the faster here; its state part's tiles
    assert sweep["output_split True"] < sweep["output_split False"] and sweep["chosen"]["OUTPUT_SPLIT"] is True
    assert sum(k.startswith("state_part ") for k in sweep) == len(taylor_bench.CANDIDATES["state_part"])
    # the two-level walk's candidates: each at both shapes, the smallest sum kept
    groups = [sweep[f"state_groups {p}"] for p in taylor_bench.STATE_GROUPS]
    assert all(len(t) == 2 and None not in t for t in groups)
    assert sweep["chosen"]["STATE_GROUP_PROGRAMS_PER_SM"] == max(taylor_bench.STATE_GROUPS) \
        == ops.STATE_GROUP_PROGRAMS_PER_SM
