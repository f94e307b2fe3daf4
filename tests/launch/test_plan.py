"""``--dry-run`` (megatron_based.training.plan): every invalid layout is rejected naming its sizes; parameter counts
match the reference models exactly and a real TP=2 model's shard; the CLI prints the plan and starts no process group."""
from __future__ import annotations

import pytest
import torch.distributed as dist

from megatron_based.model.config import ConfigError
from megatron_based.training.plan import main, make_plan
from megatron_based.training.config import load_config
from tests.distributed import run_distributed

from .conftest import REPO, write_config


def plan(config, world, *overrides, gpus_per_node=None, gpu_memory_gib=None):
    cfg = load_config(config, list(overrides), world_size=world)
    return make_plan(cfg, gpus_per_node=gpus_per_node, gpu_memory_gib=gpu_memory_gib)


@pytest.fixture
def config(dataset, tmp_path):
    return write_config(tmp_path / "run.yaml", dataset)


@pytest.mark.parametrize("world, overrides, message", [
    (3, ["parallel.tensor_model_parallel_size=2"], r"world size \(3 processes\) must be divisible by .* = 2"),
    (8, ["parallel.tensor_model_parallel_size=8"], r"num_attention_heads \(4\) must be divisible by "
                                                   r"tensor_model_parallel_size \(8\)"),
    (4, ["parallel.pipeline_model_parallel_size=4", "model.layer_pattern=CLS"],
     r"num_layers \(3, the layer_pattern length\) must be divisible by parallel.pipeline_model_parallel_size \(4\)"),
    (2, ["parallel.context_parallel_size=2", "model.seq_length=63"],
     r"seq_length \(63\) must be divisible by parallel.context_parallel_size \(2\)"),
    (4, ["parallel.tensor_model_parallel_size=4", "parallel.context_parallel_size=1", "parallel.sequence_parallel=true",
         "model.seq_length=66"], r"\(66 / 1 = 66\) must be divisible by parallel.tensor_model_parallel_size \(4\)"),
    (4, ["train.global_batch_size=6"], r"global_batch_size \(6\) must be divisible by train.micro_batch_size \(2\) "
                                       r"x data-parallel size \(4\)"),
    (2, ["train.engine=deepspeed", "parallel.pipeline_model_parallel_size=2"],
     r"pipeline_model_parallel_size \(2\) must be 1 with train.engine=deepspeed"),
    (2, ["train.engine=deepspeed", "train.zero_stage=3"], r"zero_stage \(3\) must be 1 or 2"),
])
def test_invalid_layouts_name_their_sizes(config, world, overrides, message):
    with pytest.raises(ConfigError, match=message):
        plan(config, world, *overrides)


def test_nodes_and_memory_limits(config):
    with pytest.raises(ConfigError, match=r"world size \(6\) must be a whole number of nodes of 4 GPUs"):
        plan(config, 6, "parallel.tensor_model_parallel_size=2", "train.global_batch_size=6", gpus_per_node=4)
    p = plan(config, 2)
    assert not p.notes
    with pytest.raises(ConfigError, match=r"estimated memory per GPU \(.* GiB.*\) exceeds the GPU's 0.01 GiB: lower "
                                          r"train.micro_batch_size \(2\)"):
        plan(config, 2, gpu_memory_gib=0.01)
    wide = plan(config, 8, "parallel.tensor_model_parallel_size=4", "train.global_batch_size=4", gpus_per_node=2)
    assert any("TP x CP (4 x 1) spans more than one node of 2 GPUs" in n for n in wide.notes)


@pytest.mark.parametrize("name, params", [("based-360m", 362_620_928), ("based-1.3b", 1_349_453_056)])
def test_reference_parameter_counts_and_memory(dataset, tmp_path, name, params):
    cfg = write_config(tmp_path / "run.yaml", dataset)
    overrides = [f"model.{k}={v}" for k, v in __import__("yaml").safe_load(
        (REPO / "configs" / f"{name}.yaml").read_text())["model"].items()]
    p = plan(cfg, 1, *overrides, "model.seq_length=2048")
    assert p.total_params == params == p.params_per_gpu  # based-spec.md's exact counts
    # fp32 on CPU, no sharding: 4 (weights) + 4 (gradients) + 8 (Adam moments) bytes per parameter
    assert (p.memory["parameters"], p.memory["gradients"], p.memory["optimizer"]) == (4 * params, 4 * params,
                                                                                      8 * params)
    z2 = plan(cfg, 4, *overrides, "model.seq_length=2048", "train.engine=deepspeed", "train.zero_stage=2",
              "train.global_batch_size=8")
    assert (z2.memory["gradients"], z2.memory["optimizer"]) == (params, 2 * params)  # sharded over DP 4
    full = plan(cfg, 1, *overrides, "model.seq_length=2048", "train.recompute_granularity=full")
    assert full.memory["activations"] < p.memory["activations"] / 3


def _shard_params(rank, world_size, pattern):
    from megatron_based.model import build_model
    from megatron_based.runtime.parallel import initialize_parallel
    from tests.megatron_based.helpers import tiny_config

    initialize_parallel(world_size, seed=0)
    model = build_model(tiny_config(pattern, tensor_model_parallel_size=world_size), vocab_size=1024,
                        max_sequence_length=64)
    return sum(p.numel() for p in model.parameters())


def test_per_gpu_parameters_match_a_real_tp2_shard(dataset, tmp_path):
    from tests.megatron_based.helpers import tiny_config

    c = tiny_config("CLSA", tensor_model_parallel_size=2)
    model = {"layer_pattern": "CLSA", "hidden_size": c.hidden_size, "num_attention_heads": c.num_attention_heads,
             "feature_dim": c.feature_dim, "ffn_hidden_size": c.ffn_hidden_size, "vocab_size": 1024,
             "swa_window": c.swa_window}
    cfg = write_config(tmp_path / "run.yaml", dataset, model=model)
    expected = run_distributed(_shard_params, 2, "CLSA")
    assert expected[0] == expected[1] == plan(cfg, 2, "parallel.tensor_model_parallel_size=2").params_per_gpu


def test_cli_prints_the_plan_and_starts_nothing(config, capsys):
    from megatron_based.training.loop import main as train_main

    assert train_main([str(config), "--dry-run", "--nnodes", "2", "--nproc-per-node", "2",
                       "parallel.tensor_model_parallel_size=2", "--load", "latest"]) == 0
    out = capsys.readouterr().out
    assert "4 = 2 node(s) x 2" in out and "TP 2 x CP 1 x PP 1 x DP 2" in out
    assert "global 4 = micro 2 x DP 2 x 1 micro-batches" in out
    assert not dist.is_initialized()
    assert main([str(config), "--nproc-per-node", "3", "parallel.tensor_model_parallel_size=2"]) == 2
    assert "invalid launch plan: world size (3 processes) must be divisible" in capsys.readouterr().err


def test_module_dry_run_says_one_line(config):
    """``python -m megatron_based.training.plan`` as the launchers run it: a rejected plan is one line on stderr,
    without the third-party warnings megatron-core's imports print (TransformerEngine / Apex fallbacks); --verbose
    shows them."""
    import subprocess
    import sys

    cmd = [sys.executable, "-m", "megatron_based.training.plan", str(config), "--nproc-per-node", "3",
           "parallel.tensor_model_parallel_size=2"]
    out = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert out.returncode == 2 and out.stdout == "", out.stdout
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("invalid launch plan: world size (3 processes) must be divisible"), \
        out.stderr
    loud = subprocess.run(cmd + ["--verbose"], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert loud.returncode == 2 and "Apex" in loud.stderr, loud.stderr


def test_gpu_flag_plans_a_gpu_job_from_a_machine_without_gpus(config, capsys):
    """A login node (no GPU) checking a GPU job (launch/submit.sh passes --gpu): GPU-only settings are refused
    without the flag, naming it, and accepted with it; precision auto plans bf16 and CUDA graphs on; the memory note;
    afterwards configs resolve for this machine again."""
    import torch

    from megatron_based.model.config import gpu_target

    if torch.cuda.is_available():
        pytest.skip("a machine without GPUs is what this checks")
    for override in ("train.precision=bf16", "model.cuda_graph_impl=local"):
        assert main([str(config), override]) == 2
        assert "--gpu on the dry run" in capsys.readouterr().err
        assert main([str(config), override, "--gpu"]) == 0
        out = capsys.readouterr().out
        assert "bf16" in out and "GPU memory not checked (no GPU here): pass --gpu-memory-gib" in out, out
    assert main([str(config), "--gpu"]) == 0
    out = " ".join(capsys.readouterr().out.split())
    assert "bf16" in out  # precision auto on GPU nodes
    assert "CUDA graphs │ on (model.cuda_graph_impl: auto)" in out, out  # graphs by default (test_train.py)
    assert main([str(config)]) == 0
    out = " ".join(capsys.readouterr().out.split())
    assert "fp32" in out and gpu_target() is False
    assert "CUDA graphs │ off (model.cuda_graph_impl: auto, no GPU)" in out, out
