"""benchmarks/generation.py --profile: where a decode step's time goes, per layer type, for BASED and the GPT
(tiny sizes on CPU; the same code profiles the GPU runs)."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_profile_splits_a_decode_step_by_layer_type(tmp_path):
    out = tmp_path / "generation.json"
    run = subprocess.run([sys.executable, "benchmarks/generation.py", "--tiny", "--profile", "5", "--json", str(out)],
                         cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-3000:]
    rows = {r["model"].split()[0]: r for r in json.loads(out.read_text())["results"]}
    # configs/tiny.yaml is CLSC: each mixer's step under its letter; the GPT is all "A"
    for model, mixers, absent in (("BASED", {"C", "L", "S"}, {"A"}), ("GPT", {"A"}, {"C", "L", "S"})):
        prof = rows[model]["profile"]
        assert prof["steps"] == 5 and prof["batch"] == rows[model]["batch"] == 4
        by_type = {label: v["total"] for label, v in prof["by_type"].items()}
        assert mixers | {"MLP", "norm", "head+loss"} <= by_type.keys() and not absent & by_type.keys(), by_type
        assert all(by_type[m] > 0 for m in mixers)
        # the labelled work is part of the step's wall time, not more
        assert 0 < prof["attributed_ms"] <= prof["wall_ms_per_step"] * 1.05, prof
        assert f"{model}" in run.stdout and "profile (ms per step)" in run.stdout
