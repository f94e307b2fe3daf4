"""Training loss curves over 20 steps are the same whatever the layout: on 2 processes DP=2, TP=2 with sequence
parallel and CP=2; on 4 processes PP=2 x DP=2 and PP=2 x CP=2 (the weights start equal: Megatron's CPU init builds every full weight and slices it)."""
import pytest

from ..distributed import run_distributed
from .test_data import corpus  # noqa: F401 - the session fixture
from .test_train import tiny_config


def _losses(rank, world, cfg):
    from megatron_based.train import train

    losses = {}
    train(cfg, step_hook=lambda step, loss, model: losses.__setitem__(step, loss))
    return losses


PP2 = ["parallel.pipeline_model_parallel_size=2"]
LAYOUTS = {  # name: (world size, overrides)
    "dp2": (2, []),
    "tp2_sp": (2, ["parallel.tensor_model_parallel_size=2", "parallel.sequence_parallel=true"]),
    "cp2": (2, ["parallel.context_parallel_size=2"]),
    # A pipeline stage initialises only its own layers, so PP runs are compared with PP runs.
    "pp2_dp2": (4, PP2),
    "pp2_cp2": (4, PP2 + ["parallel.context_parallel_size=2"]),
}
REFERENCE = {"tp2_sp": "dp2", "cp2": "dp2", "pp2_cp2": "pp2_dp2"}


@pytest.fixture(scope="module")
def curves(tmp_path_factory, corpus):  # noqa: F811
    out = {}
    for name, (world, overrides) in LAYOUTS.items():
        cfg = tiny_config(tmp_path_factory.mktemp(name), corpus, overrides + ["train.train_steps=20"],
                          world_size=world)
        out[name] = run_distributed(_losses, world, cfg)[-1]
    return out


@pytest.mark.parametrize("layout", sorted(REFERENCE))
def test_loss_curve_matches_data_parallel(curves, layout):
    ref, got = curves[REFERENCE[layout]], curves[layout]
    assert sorted(got) == sorted(ref) == list(range(1, 21))
    assert ref[20] < ref[1] - 0.5  # the curve being compared actually trains
    for step in ref:
        assert got[step] == pytest.approx(ref[step], rel=1e-5, abs=1e-5), (layout, step, got[step], ref[step])
