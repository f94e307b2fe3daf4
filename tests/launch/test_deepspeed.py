"""The DeepSpeed engine (ZeRO-1 and ZeRO-2, 2 gloo ranks) against Megatron DDP: same seed, same data, same loss
curve at fp32 tolerance; a DeepSpeed checkpoint resumes the curve exactly where it stopped."""
from __future__ import annotations

import pytest

from tests.distributed import run_distributed

from .conftest import write_config

pytestmark = pytest.mark.launch
deepspeed = pytest.importorskip("deepspeed", reason="pip install 'megatron-based[deepspeed]' (DS_BUILD_OPS=0)")


RUNS = {  # name: overrides
    "megatron": ["train.engine=megatron"],
    "zero1": ["train.engine=deepspeed", "train.zero_stage=1"],
    "zero2": ["train.engine=deepspeed", "train.zero_stage=2"],
    "zero2-first-half": ["train.engine=deepspeed", "train.zero_stage=2", "train.train_steps=3"],
    "zero2-resumed": ["train.engine=deepspeed", "train.zero_stage=2", "train.load=latest"],
}


def _curves(rank, world_size, config_path):
    from megatron_based.training.loop import train
    from megatron_based.training.config import load_config

    curves = {}
    for name, overrides in RUNS.items():
        save = f"{config_path}.{name.split('-')[0]}"  # the two halves share a checkpoint directory
        cfg = load_config(config_path, [*overrides, f"train.save={save}"], world_size=world_size)
        curves[name] = []
        train(cfg, step_hook=lambda step, loss, model, c=curves[name]: c.append((step, loss)))
    return curves


def test_zero_1_and_2_match_megatron_ddp(dataset, tmp_path):
    # lr_decay_steps fixed, so the 3-step half runs the same schedule as the 6-step runs
    config = write_config(tmp_path / "run.yaml", dataset, train={"lr_decay_steps": 6})
    curves = run_distributed(_curves, 2, str(config), timeout=600)
    assert curves[0] == curves[1]  # every rank reports the same global loss
    c = curves[0]
    reference = c["megatron"]
    assert [s for s, _ in reference] == list(range(1, 7))
    assert reference[-1][1] < reference[0][1] - 0.05  # it learns
    for name in ("zero1", "zero2"):
        assert [s for s, _ in c[name]] == list(range(1, 7))
        for (_, a), (_, b) in zip(c[name], reference):
            assert a == pytest.approx(b, rel=2e-5, abs=1e-5), name
    # 3 steps, save, resume to 6: the same curve as 6 steps in one go
    assert [s for s, _ in c["zero2-first-half"] + c["zero2-resumed"]] == list(range(1, 7))
    for (_, a), (_, b) in zip(c["zero2-first-half"] + c["zero2-resumed"], c["zero2"]):
        assert a == pytest.approx(b, rel=1e-6, abs=1e-7)
