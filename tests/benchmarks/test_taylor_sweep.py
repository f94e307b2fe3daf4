"""The Taylor benchmark's sweep (benchmarks/taylor_attention.py --sweep, GPU only) with its GPU parts replaced: a chunk
whose check fails at the default gradient tiles is timed at the same tiles with 4 warps (chunk 64 at 8 warps crashes
on an H100), and the chunk kept goes on with the tiles it was timed with; the candidates include the shipped tiles."""
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


@pytest.mark.parametrize("chunk64_faster", [True, False])
def test_chunk_sweep_falls_back_to_4_warps(monkeypatch, chunk64_faster):
    ops = taylor_bench.ops
    monkeypatch.setitem(ops.CONFIG, "grad", (32, 64, 8, 1))
    monkeypatch.setattr(ops, "CHUNK", ops.CHUNK)
    monkeypatch.setattr(ops, "GRAD_SPLIT", ops.GRAD_SPLIT)
    monkeypatch.setattr(ops, "KEEP_STATES", ops.KEEP_STATES)
    for name in ("state", "output"):
        monkeypatch.setitem(ops.CONFIG, name, ops.CONFIG[name])
    checks, timed = [], []

    def checked(chunk, grad, split):
        checks.append((chunk, tuple(grad), split))
        return not (chunk == 64 and grad[2] == 8)  # what the H100 does

    def time_case(fn, B, T, dv, kind, budget_ms=300):
        timed.append((ops.CHUNK, ops.CONFIG["grad"], ops.GRAD_SPLIT, kind))
        if len(timed) <= 2:  # the chunk comparison
            return 1.0 if (ops.CHUNK == 64) == chunk64_faster else 2.0
        return 3.0 + len(timed) / 100  # later candidates slower: the first of each pass stays

    monkeypatch.setattr(taylor_bench, "checked", checked)
    monkeypatch.setattr(taylor_bench, "time_case", time_case)
    results = {}
    taylor_bench.sweep(results, lambda: None)
    # chunk 64: the default (8 warps) failed its check, 4 warps passed and was timed; chunk 128 at the default
    assert checks[:3] == [(64, (32, 64, 8, 1), False), (64, (32, 64, 4, 1), False), (128, (32, 64, 8, 1), False)]
    assert timed[:2] == [(64, (32, 64, 4, 1), False, "fwdbwd"), (128, (32, 64, 8, 1), False, "fwdbwd")]
    sweep = results["sweep"]
    assert sweep["chunk64_fwdbwd"] == (1.0 if chunk64_faster else 2.0)
    # the pass sweeps run at the chunk kept; at chunk 64 every 8-warp gradient candidate fails its check
    assert all(t[0] == (64 if chunk64_faster else 128) for t in timed[2:])
    grad = {ast.literal_eval(k[len("grad "):]): t for k, t in sweep.items() if k.startswith("grad ")}
    assert grad and all((t is None) == (chunk64_faster and cfg[2] == 8) for cfg, t in grad.items())
    assert sweep["chosen"]["CHUNK"] == (64 if chunk64_faster else 128)
