"""benchmarks/swa_tiles.py (the SWA tile sweep, GPU only): its candidates include every config the kernels ship,
so a sweep always times the shipped tiles against the others."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "benchmarks"))

import swa_tiles  # noqa: E402


def test_candidates_include_every_shipped_config():
    for tuner, candidates in swa_tiles.CANDIDATES.items():
        shipped = {swa_tiles.key(c) for c in tuner.configs.all}
        assert shipped <= {swa_tiles.key(c) for c in candidates}, (tuner.fn.__name__, shipped)
        assert len({swa_tiles.key(c) for c in candidates}) == len(candidates), tuner.fn.__name__  # no repeats


def test_help_runs_without_a_gpu():
    run = subprocess.run([sys.executable, "benchmarks/swa_tiles.py", "--help"], cwd=ROOT, capture_output=True,
                         text=True, timeout=120)
    assert run.returncode == 0 and "--cases" in run.stdout, run.stderr[-2000:]
