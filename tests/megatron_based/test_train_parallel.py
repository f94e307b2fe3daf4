"""Training loss curves over 20 steps are the same whatever the layout of 2 processes: DP=2, TP=2 with sequence
parallel, CP=2 (the weights start equal: Megatron's CPU init builds every full weight and slices it)."""
import pytest

from ..distributed import run_distributed
from .test_data import corpus  # noqa: F401 - the session fixture
from .test_train import tiny_config


def _losses(rank, world, cfg):
    from megatron_based.train import train

    losses = {}
    train(cfg, step_hook=lambda step, loss, model: losses.__setitem__(step, loss))
    return losses


LAYOUTS = {
    "dp2": [],
    "tp2_sp": ["parallel.tensor_model_parallel_size=2", "parallel.sequence_parallel=true"],
    "cp2": ["parallel.context_parallel_size=2"],
}


@pytest.fixture(scope="module")
def curves(tmp_path_factory, corpus):  # noqa: F811
    out = {}
    for name, overrides in LAYOUTS.items():
        cfg = tiny_config(tmp_path_factory.mktemp(name), corpus, overrides + ["train.train_steps=20"], world_size=2)
        out[name] = run_distributed(_losses, 2, cfg)[0]
    return out


@pytest.mark.parametrize("layout", ["tp2_sp", "cp2"])
def test_loss_curve_matches_data_parallel(curves, layout):
    ref, got = curves["dp2"], curves[layout]
    assert sorted(got) == sorted(ref) == list(range(1, 21))
    assert ref[20] < ref[1] - 0.5  # the curve being compared actually trains
    for step in ref:
        assert got[step] == pytest.approx(ref[step], rel=1e-5, abs=1e-5), (layout, step, got[step], ref[step])
