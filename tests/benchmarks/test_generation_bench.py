"""benchmarks/generation.py --profile: where a decode step's time goes, per layer type, for BASED and the GPT
(tiny sizes on CPU; the same code profiles the GPU runs), including the static eager twin that gives a CUDA-graphed
step's per-layer split."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import yaml

from tests.distributed import run_distributed

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "benchmarks"))

import generation  # noqa: E402

TINY = yaml.safe_load((ROOT / "configs/tiny.yaml").read_text())["model"]


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
        assert "profile_static" not in rows[model]  # no CUDA-graph run on CPU: no static twin
    assert "static (eager) step profile" not in run.stdout


def _static_twin_profiles(rank, world):
    from megatron_based.runtime.parallel import initialize_parallel

    initialize_parallel(1)
    args = SimpleNamespace(profile=3, new_tokens=12, prompt_length=8)
    out = {}
    for name, pattern in (("BASED", TINY["layer_pattern"]), ("GPT", "A" * len(TINY["layer_pattern"]))):
        model, spec = generation.build(TINY, pattern, torch.float32)
        out[name] = generation.profile_static_twin(model, pattern, spec, 2, args.prompt_length + args.new_tokens, args)
        # the profile's per-mixer labels are removed again (no instance attribute left over the method)
        assert not any("step" in vars(layer.self_attention) for layer in model.decoder.layers)
    return out


def test_static_twin_splits_the_graphed_step_by_layer_type():
    """What a CUDA-graphed run's profile_static is: the static_decode step (the graph's fixed-shape step, run
    eagerly) opens the layer ranges, so each mixer letter of configs/tiny.yaml's pattern gets its time (CPU)."""
    profiles = run_distributed(_static_twin_profiles, 1)[0]
    for model, pattern in (("BASED", TINY["layer_pattern"]), ("GPT", "A" * len(TINY["layer_pattern"]))):
        prof = profiles[model]
        assert prof["steps"] == 3 and prof["batch"] == 2, prof
        by_type = {label: v["total"] for label, v in prof["by_type"].items()}
        assert all(by_type.get(m, 0) > 0 for m in set(pattern)), (model, by_type)
        assert not set("ACLS") - set(pattern) & by_type.keys(), (model, by_type)
        assert {"MLP", "norm", "head+loss"} <= by_type.keys(), (model, by_type)
        assert 0 < prof["attributed_ms"] <= prof["wall_ms_per_step"] * 1.05, prof


@pytest.mark.parametrize("argv", [["--profile", "5", "--new-tokens", "9"], ["--profile", "-1"]])
def test_profile_argument_errors(argv, capsys):
    """--profile with --new-tokens <= 9 (no step left to profile: it divided by zero) or a negative --profile is
    refused at argument parsing."""
    with pytest.raises(SystemExit) as exit_:
        generation.main(argv)
    assert exit_.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert "--profile" in err and ("--new-tokens" in err if "--new-tokens" in argv else ">= 0" in err), err
