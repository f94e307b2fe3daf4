"""Training loss curves over 20 steps are the same whatever the layout: on 2 processes DP=2, TP=2 with sequence
parallel and CP=2; on 4 processes PP=2 x DP=2 and PP=2 x CP=2 (the weights start equal: Megatron's CPU init builds every full weight and slices it)."""
import pytest

from ..distributed import run_distributed
from .test_data import corpus  # noqa: F401 - the session fixture
from .test_train import tiny_config


def _losses(rank, world, cfg):
    from megatron_based.training.loop import train

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


# --- resharding: a DP=2 checkpoint of Megatron's distributed optimizer resumes at another layout -----------------

RESHARD = {  # name: (world size, overrides)
    "dp2": (2, []),
    "dp1": (1, []),
    "tp2_sp": (2, ["parallel.tensor_model_parallel_size=2", "parallel.sequence_parallel=true"]),
    "pp2": (2, PP2),
    "cp2": (2, ["parallel.context_parallel_size=2"]),
}


def _resume_losses(rank, world, cfg):
    from megatron_based.training import checkpointing
    from megatron_based.training.loop import train

    losses = {}
    train(cfg, step_hook=lambda step, loss, model: losses.__setitem__(step, loss))
    manifest = checkpointing.verify(checkpointing.resolve("latest", cfg.train.save))
    return losses, manifest["optimizer_format"]


@pytest.fixture(scope="module")
def dp2_run(tmp_path_factory, corpus):  # noqa: F811
    """10 steps at DP=2 with a save at step 5 (and 10), per optimizer format."""
    runs = {}
    for fmt in ("fully_reshardable", "dp_reshardable"):
        root = tmp_path_factory.mktemp(f"dp2_{fmt}")
        cfg = tiny_config(root, corpus, ["train.train_steps=10", "train.save_interval=5", f"train.save={root}/ckpt",
                                         f"train.optimizer_checkpoint_format={fmt}"], world_size=2)
        runs[fmt] = (root, run_distributed(_resume_losses, 2, cfg)[-1][0])
    return runs


def _resume_at(tmp_path, corpus, root, layout, fmt):  # noqa: F811
    """Copy the step-5 checkpoint of ``root`` and resume it at ``layout`` for steps 6-10."""
    import shutil

    save = tmp_path / "ckpt"
    shutil.copytree(root / "ckpt" / "step_00000005", save / "step_00000005")
    (save / "latest").write_text("step_00000005\n")
    world, overrides = RESHARD[layout]
    cfg = tiny_config(tmp_path, corpus, overrides + ["train.train_steps=10", "train.load=latest", f"train.save={save}",
                                                     f"train.optimizer_checkpoint_format={fmt}"], world_size=world)
    return run_distributed(_resume_losses, world, cfg)[-1]


@pytest.mark.parametrize("layout", sorted(RESHARD))
def test_fully_reshardable_checkpoint_resumes_at_any_layout(dp2_run, tmp_path, corpus, layout):  # noqa: F811
    root, ref = dp2_run["fully_reshardable"]
    losses, fmt = _resume_at(tmp_path, corpus, root, layout, "fully_reshardable")
    assert fmt == "fully_reshardable" and sorted(losses) == list(range(6, 11))
    assert ref[10] < ref[1] - 0.3  # the run being compared actually trains
    for step in losses:
        if layout == "dp2":  # the same layout resumes bitwise
            assert losses[step] == ref[step], (step, losses[step], ref[step])
        else:  # PP sums the tied embedding's two gradient copies across stages: fp32 rounding, grown by Adam
            rel = 1e-4 if layout == "pp2" else 1e-5
            assert losses[step] == pytest.approx(ref[step], rel=rel, abs=1e-5), (layout, step, losses[step])


def test_dp_reshardable_resumes_at_another_dp_and_refuses_another_tp(dp2_run, tmp_path, corpus):  # noqa: F811
    from megatron_based.training.checkpointing import CheckpointError

    root, ref = dp2_run["dp_reshardable"]
    same, fmt = _resume_at(tmp_path / "dp2", corpus, root, "dp2", "dp_reshardable")
    assert fmt == "dp_reshardable" and sorted(same) == list(range(6, 11))
    assert same == {step: ref[step] for step in same}  # bitwise at the saved layout
    losses, _ = _resume_at(tmp_path / "dp1", corpus, root, "dp1", "dp_reshardable")
    for step in losses:
        assert losses[step] == pytest.approx(ref[step], rel=1e-5, abs=1e-5), (step, losses[step], ref[step])
    with pytest.raises(Exception, match=r"dp_reshardable optimizer state written at TP=1 PP=1 CP=1; it loads only at "
                                        r"that TP/PP/CP \(now TP=2 PP=1 CP=1\)") as info:
        _resume_at(tmp_path / "tp2", corpus, root, "tp2_sp", "dp_reshardable")
    assert "CheckpointError" in str(info.value) or isinstance(info.value, CheckpointError)
