"""Training entry point: config validation before any process group, preprocess -> dataset -> steps end to end,
loss going down, a bitwise-exact resume after SIGKILL and after SIGTERM to a torchrun process group, one run per
save directory, and no non-finite state ever saved (docs/training.md, "Faults")."""
from __future__ import annotations

import io
import math
import multiprocessing as mp
import os
import queue as queue_mod
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import yaml

from megatron_based.training import checkpointing
from megatron_based.model.config import ConfigError
from megatron_based.training.config import load_config

from ..distributed import run_distributed
from .test_data import corpus  # noqa: F401 - the session fixture

TINY = {
    "model": {"layer_pattern": "CLSC", "hidden_size": 64, "num_attention_heads": 4, "feature_dim": 4,
              "swa_window": 8, "vocab_size": 512, "seq_length": 32},
    "train": {"micro_batch_size": 2, "global_batch_size": 4, "train_steps": 8, "lr": 3e-3, "min_lr": 3e-4,
              "lr_warmup_steps": 2, "eval_interval": 0, "progress": False, "log_interval": 1000},
    "data": {"split": "90,10,0"},
}


def tiny_config(tmp_path, corpus, overrides=(), world_size=1, **sections):  # noqa: F811
    """The tiny run config on the session corpus, written to ``tmp_path/run.yaml`` and loaded like the CLI does."""
    raw = {k: dict(v) for k, v in TINY.items()}
    raw["data"].update(path=[corpus["prefix"]], tokenizer_model=corpus["tokenizer"],
                       cache_dir=str(tmp_path / "cache"))
    for name, values in sections.items():
        raw.setdefault(name, {}).update(values)
    tmp_path.mkdir(parents=True, exist_ok=True)
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(raw))
    return load_config(path, list(overrides), world_size=world_size)


def _child(fn, args, q):
    os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")  # one process: an in-process rendezvous, no port
    torch.set_num_threads(1)
    try:
        q.put(("ok", by_value(fn(*args))))
    except BaseException as e:  # noqa: BLE001 - report everything
        import traceback

        q.put(("error", f"{type(e).__name__}: {e}\n{traceback.format_exc()}"))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def by_value(obj) -> bytes:
    """Tensors sent through a multiprocessing queue travel as shared-memory handles that die with the sender; send
    bytes instead (read back with :func:`from_bytes`)."""
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


def from_bytes(data: bytes):
    return torch.load(io.BytesIO(data), weights_only=True)


def forked(fn, *args, timeout: float = 300):
    """``fn(*args)`` in a forked single-rank process (Megatron already imported). Returns ``(exitcode, status,
    payload)``: status "ok" (payload = result), "error" (payload = traceback) or None (died silently, e.g. SIGKILL)."""
    ctx = mp.get_context("fork")
    q = ctx.Queue()
    p = ctx.Process(target=_child, args=(fn, args, q))
    p.start()
    result, deadline = (None, None), time.time() + timeout
    while time.time() < deadline:
        try:
            result = q.get(timeout=0.2)
            break
        except queue_mod.Empty:
            if not p.is_alive():
                try:
                    result = q.get(timeout=1)
                except queue_mod.Empty:
                    pass
                break
    p.join(30)
    if p.is_alive():
        p.kill()
        p.join()
    status, payload = result
    return p.exitcode, status, from_bytes(payload) if status == "ok" else payload


def ok(run):
    code, status, payload = run
    assert status == "ok", payload
    return payload


def _train(cfg, kill_at=None):
    """Train; return the loss per step and the final parameters (flattened). ``kill_at``: SIGKILL self then."""
    from megatron_based.training.loop import train

    losses, params = {}, {}

    def hook(step, loss, model):
        losses[step] = loss
        if step == kill_at:
            os.kill(os.getpid(), signal.SIGKILL)
        params["final"] = torch.cat([p.detach().reshape(-1).clone() for p in model.parameters()])

    summary = train(cfg, step_hook=hook)
    return {"losses": losses, "params": params.get("final"), "summary": summary}


# --- configuration errors: raised by load_config, before any process group ---------------------------------------

@pytest.mark.parametrize("overrides, world, message", [
    (["train.lr_sched=3"], 1, r"unknown key\(s\) \['train.lr_sched'\]"),
    (["optim.lr=3"], 1, r"unknown config section\(s\) \['optim'\]"),
    (["model.hidden_sizes=3"], 1, r"unknown model key\(s\) \['hidden_sizes'\]"),
    (["train.global_batch_size=6"], 2, r"train.global_batch_size \(6\) must be divisible by train.micro_batch_size "
                                       r"\(2\) x data-parallel size \(2\)"),
    (["data.path=[/nonexistent/prefix]"], 1, r"data.path: /nonexistent/prefix.bin does not exist"),
    (["data.path=[]"], 1, r"data.path is missing"),
    (["data.tokenizer_model=/nonexistent.model"], 1, r"data.tokenizer_model: /nonexistent.model does not exist"),
    (["parallel.tensor_model_parallel_size=3"], 3, r"num_attention_heads \(4\) must be divisible by "
                                                   r"tensor_model_parallel_size \(3\)"),
    (["parallel.tensor_model_parallel_size=2"], 3, r"world size \(3 processes\) must be divisible"),
    (["train.precision=fp16"], 1, r"train.precision is 'fp16'; use one of"),
    (["train.lr=fast"], 1, r"train.lr must be float, got 'fast'"),
    (["model.vocab_size=100"], 1, r"model.vocab_size \(100\) is smaller than the tokenizer's vocabulary \(512"),
    (["train.lr_warmup_steps=8"], 1, r"train.lr_warmup_steps \(8\) must be smaller than"),
    (["train.load=latest"], 1, r"train.load=latest resumes from train.save, which is not set"),
    (["train.load=auto"], 1, r"train.load=auto resumes from train.save, which is not set"),
    (["train.lr=inf"], 1, r"train.lr \(inf\) must be a finite number > 0"),
    (["train.lr=nan"], 1, r"train.lr \(nan\) must be a finite number > 0"),
    (["train.lr=0"], 1, r"train.lr \(0.0\) must be a finite number > 0"),
    (["train.min_lr=1"], 1, r"train.min_lr \(1.0\) must be a finite number in \[0, train.lr = 0.003\]"),
    (["train.lr_warmup_init=-1"], 1, r"train.lr_warmup_init \(-1.0\) must be a finite number >= 0"),
    (["train.weight_decay=-.inf"], 1, r"train.weight_decay \(-inf\) must be a finite number >= 0"),
    (["train.adam_beta1=-0.1"], 1, r"train.adam_beta1 \(-0.1\) must be a finite number in \[0, 1\)"),
    (["train.adam_beta2=1"], 1, r"train.adam_beta2 \(1.0\) must be a finite number in \[0, 1\)"),
    (["train.adam_eps=0"], 1, r"train.adam_eps \(0.0\) must be a finite number > 0"),
    (["train.clip_grad=-1"], 1, r"train.clip_grad \(-1.0\) must be a finite number >= 0"),
    (["train.max_nonfinite_steps=0"], 1, r"train.max_nonfinite_steps \(0\) must be >= 1"),
    (["train.lr=-1e-3"], 1, r"train.lr \(-0.001\) must be a finite number > 0"),
    (["train.min_lr=-1"], 1, r"train.min_lr \(-1.0\) must be a finite number in \[0, train.lr = 0.003\]"),
    (["parallel.sequence_parallel=true"], 1, r"parallel.sequence_parallel=true needs "
                                             r"parallel.tensor_model_parallel_size > 1 .*: set sequence_parallel=false"),
    (["train.load=/nonexistent/ckpt"], 1, r"train.load \(--load\): checkpoint directory /nonexistent/ckpt does not "
                                          r"exist; give a checkpoint directory"),
    (["data.split=abc"], 1, r"data.split 'abc' must be up to three non-negative weights train,valid,test"),
    (["data.split=0,1,0"], 1, r"data.split '0,1,0' gives the train split weight 0: give it a weight"),
    (["data.split=98,0,0", "train.eval_interval=5"], 1, r"data.split '98,0,0' gives the valid split weight 0 but "
                                                        r"train.eval_interval \(5\) needs it: .* or set "
                                                        r"train.eval_interval=0"),
    (["model.seq_length=100000"], 1, r"the train split of .*kjv \(data.split '90,10,0': documents \[0, \d+\) of "
                                     r"\d+\) holds \d+ documents, \d+ tokens, fewer than one sample of "
                                     r"model.seq_length \+ 1 = 100001: add documents, lower model.seq_length"),
    (["trainlr=1"], 1, r"override 'trainlr=1' must look like section.key=value"),
    (["model.hidden_size=["], 1, r"override 'model.hidden_size=\[': its value is not valid YAML \(while parsing"),
    (["model.hidden_size=abc"], 1, r"model.hidden_size must be int, got 'abc'"),  # was a TypeError traceback
    (["model.make_vocab_size_divisible_by=0"], 1, r"model.make_vocab_size_divisible_by \(0\) must be a positive"),
    (["parallel.pipeline_model_parallel_size=2", "model.layer_pattern=CLS"], 2,
     r"num_layers \(3, the layer_pattern length\) must be divisible by parallel.pipeline_model_parallel_size \(2\)"),
])
def test_invalid_configs_fail_early_naming_the_key(tmp_path, corpus, overrides, world, message):  # noqa: F811
    with pytest.raises(ConfigError, match=message):
        tiny_config(tmp_path, corpus, overrides, world_size=world)
    assert not dist.is_initialized()


def test_bad_files_and_folders_fail_before_starting(tmp_path, corpus):  # noqa: F811
    """A config file that is not YAML, a --load directory that holds no checkpoint or a truncated one, and a file
    where the run writes a folder: each failed only once the process groups, the model and the optimizer were built
    (or with a traceback); now load_config names it."""
    bad = tmp_path / "bad.yaml"
    bad.write_text("model:\n  hidden_size: [\n")
    with pytest.raises(ConfigError, match=rf"^config file {re.escape(str(bad))} is not valid YAML \(while parsing"):
        load_config(bad)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ConfigError) as err:
        tiny_config(tmp_path, corpus, [f"train.load={empty}"])
    assert str(err.value) == (f"train.load (--load): {empty}/manifest.json is missing: {empty} is not a complete "
                              "checkpoint (interrupted save?); give a checkpoint directory, a save directory, latest "
                              "or auto")
    cut = tmp_path / "step_00000002"
    cut.mkdir()
    (cut / "manifest.json").write_text('{"files": {"__0_0.distcp": {"bytes": 100, "crc32": 0}}}')
    (cut / "__0_0.distcp").write_bytes(b"partial")
    with pytest.raises(ConfigError, match=rf"^train.load \(--load\): checkpoint file {re.escape(str(cut))}/"
                                          r"__0_0.distcp has 7 bytes, 100 were written \(truncated or overwritten\)"):
        tiny_config(tmp_path, corpus, [f"train.load={cut}"])
    for key in ("train.save", "train.tensorboard_dir", "data.cache_dir"):
        with pytest.raises(ConfigError) as err:
            tiny_config(tmp_path, corpus, [f"{key}={bad}"])
        assert str(err.value) == f"{key}: {bad} is a file; give a directory (created if missing)"
    assert not dist.is_initialized()


def test_cli_reports_config_errors_without_starting(tmp_path, corpus, capsys):  # noqa: F811
    from megatron_based.training.loop import main

    tiny_config(tmp_path, corpus)
    assert main([str(tmp_path / "run.yaml"), "train.micro_batch_size=3"]) == 2
    assert "train.global_batch_size (4) must be divisible by train.micro_batch_size (3)" in capsys.readouterr().err
    assert not dist.is_initialized()


def five_documents(tmp_path, corpus) -> str:  # noqa: F811
    """The first five documents of the session corpus as their own indexed dataset."""
    from megatron_based.training.data import open_indexed

    from .test_data import write_indexed

    ds = open_indexed(corpus["prefix"])
    return write_indexed(str(tmp_path / "five"), [ds[i].tolist() for i in range(5)])


def test_a_five_document_corpus_fails_naming_the_empty_split(tmp_path, corpus):  # noqa: F811
    """Megatron's dataset builder never returns on it (the valid split holds no documents, even with validation
    off); the config check says so in one line, before any process group."""
    from megatron_based.training.data import open_indexed

    prefix = five_documents(tmp_path, corpus)
    message = (f"the valid split of {prefix} (data.split '95,5,0': documents [5, 5) of 5) holds 0 documents, 0 tokens: "
               "Megatron never finishes building an empty split; add documents or raise its weight in data.split, or "
               "set its weight to 0")
    with pytest.raises(ConfigError) as err:
        tiny_config(tmp_path, corpus, [f"data.path=[{prefix}]", "data.split=95,5,0", "train.eval_interval=0"])
    assert str(err.value) == message
    with pytest.raises(ConfigError, match=re.escape(message.replace("weight to 0", "weight to 0 and "
                                                                    "train.eval_interval=0"))):
        tiny_config(tmp_path, corpus, [f"data.path=[{prefix}]", "data.split=95,5,0", "train.eval_interval=5"])
    assert not dist.is_initialized()
    # With the valid split off, the five documents are one train split of their tokens.
    ds = open_indexed(prefix)  # bound while its lengths (a view of the .idx mapping) are read
    tokens = int(ds.sequence_lengths.sum())
    cfg = tiny_config(tmp_path, corpus, [f"data.path=[{prefix}]", "data.split=100,0,0", "train.eval_interval=0",
                                         f"model.seq_length={tokens - 1}"])
    assert cfg.model_spec().seq_length == tokens - 1
    with pytest.raises(ConfigError, match=rf"documents \[0, 5\) of 5\) holds 5 documents, {tokens} tokens, fewer than "
                                          rf"one sample of model.seq_length \+ 1 = {tokens + 1}"):
        tiny_config(tmp_path, corpus, [f"data.path=[{prefix}]", "data.split=100,0,0", "train.eval_interval=0",
                                       f"model.seq_length={tokens}"])


def test_an_empty_dataset_fails_naming_the_file(tmp_path, corpus):  # noqa: F811
    from .test_data import write_indexed

    prefix = write_indexed(str(tmp_path / "empty"), [])
    assert Path(prefix + ".bin").stat().st_size == 0
    with pytest.raises(ConfigError) as err:
        tiny_config(tmp_path, corpus, [f"data.path=[{prefix}]"])
    assert str(err.value) == (f"data.path: {prefix}.bin is empty (preprocessed from an empty corpus?); re-run "
                              "megatron-based-preprocess on a corpus with text")


def test_cli_config_error_is_one_line_from_rank_0(tmp_path, corpus, capsys, monkeypatch):  # noqa: F811
    """Every rank fails the same check with exit code 2. Rank 0 prints it at once; the others wait
    (``CONFIG_ERROR_WAIT_S``: torchrun stops them when rank 0 exits) and only then print theirs, naming the rank."""
    from megatron_based.training import loop as train

    tiny_config(tmp_path, corpus)
    args = [str(tmp_path / "run.yaml"), "--load", str(tmp_path / "missing")]
    message = (f"train.load (--load): checkpoint directory {tmp_path}/missing does not exist; give a checkpoint "
               "directory, a save directory, latest or auto")
    waits = []
    monkeypatch.setattr(train.time, "sleep", waits.append)
    for rank in (0, 1):
        for key, value in dict(RANK=rank, LOCAL_RANK=rank, WORLD_SIZE=2, LOCAL_WORLD_SIZE=2, MASTER_ADDR="127.0.0.1",
                               MASTER_PORT=29500).items():
            monkeypatch.setenv(key, str(value))
        assert train.main(args) == 2
        assert capsys.readouterr().err == f"config error{' (rank 1)' if rank else ''}: {message}\n"
        assert waits == ([train.CONFIG_ERROR_WAIT_S] if rank else [])
    assert not dist.is_initialized()


def test_tiny_yaml_is_a_valid_run_config(tmp_path, corpus):  # noqa: F811
    from pathlib import Path

    cfg = load_config(Path(__file__).parents[2] / "configs" / "tiny.yaml",
                      [f"data.path=[{corpus['prefix']}]", f"data.tokenizer_model={corpus['tokenizer']}"])
    assert cfg.model_spec().config.layer_pattern == "CLSC" and cfg.num_microbatches == 2


@pytest.mark.parametrize("overrides, world, impl, why", [
    ([], 1, "local", "auto"),
    (["model.cuda_graph_impl=auto"], 2, "local", "auto"),  # data parallelism keeps the graphs
    (["model.cuda_graph_impl=none"], 1, "none", "none"),
    (["train.recompute_granularity=selective"], 1, "none", "auto, train.recompute_granularity selective"),
    (["train.engine=deepspeed"], 1, "none", "auto, train.engine deepspeed"),
    (["parallel.tensor_model_parallel_size=2"], 2, "none", "auto, tensor parallelism"),
    (["parallel.pipeline_model_parallel_size=2"], 2, "none", "auto, pipeline parallelism"),
    (["parallel.context_parallel_size=2"], 2, "none", "auto, context parallelism"),
    (["model.layer_pattern=CLZS"], 1, "none", "auto, layer_pattern has Z layers"),
])
def test_cuda_graphs_auto_on_only_where_verified(tmp_path, corpus, overrides, world, impl, why):  # noqa: F811
    """model.cuda_graph_impl (default auto) for GPU runs: Megatron's per-layer CUDA graphs where graphed steps are
    checked against eager ones (GPU tests), eager elsewhere with the reason; CPU runs are always eager; a config
    saved with auto builds (its checkpoint's architecture check, the inference loader)."""
    from megatron_based.model.config import model_spec_from_dict, planning_for

    with planning_for(True):
        cfg = tiny_config(tmp_path, corpus, overrides, world_size=world)
        assert cfg.cuda_graphs() == (impl, f"model.cuda_graph_impl: {why}")
        assert cfg.model_spec().config.cuda_graph_impl == impl
    with planning_for(False):
        cfg = tiny_config(tmp_path, corpus, [o for o in overrides if "cuda_graph_impl" not in o], world_size=world)
        assert cfg.model_spec().config.cuda_graph_impl == "none"
        if not overrides:
            assert cfg.cuda_graphs() == ("none", "model.cuda_graph_impl: auto, no GPU")
    saved = {**cfg.to_dict()["model"], "cuda_graph_impl": "auto"}
    assert model_spec_from_dict(saved).config.cuda_graph_impl == "none"


def test_cuda_graph_impl_bad_value_names_the_key(tmp_path, corpus):  # noqa: F811
    with pytest.raises(ConfigError, match=r"model.cuda_graph_impl must be auto, none or local .*; got 'full'"):
        tiny_config(tmp_path, corpus, ["model.cuda_graph_impl=full"])


# --- end to end -----------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def fifty_steps(tmp_path_factory, corpus):  # noqa: F811
    tmp = tmp_path_factory.mktemp("fifty")
    cfg = tiny_config(tmp, corpus, ["train.train_steps=50", "train.lr_warmup_steps=5", f"train.save={tmp}/ckpt",
                                    "train.eval_interval=25", "train.eval_iters=2"])
    return ok(forked(_train, cfg)), tmp


def test_preprocess_to_first_step(fifty_steps):
    run, tmp = fifty_steps
    # Initial weights are N(0, 0.02): the first loss is that of a near-uniform prediction over the padded vocabulary.
    assert run["losses"][1] == pytest.approx(math.log(512), abs=0.05)
    assert (tmp / "ckpt" / "latest").read_text().strip() == "step_00000050"
    assert run["summary"]["skipped_steps"] == 0


def test_loss_decreases_over_fifty_steps(fifty_steps, corpus):  # noqa: F811
    from megatron_based.training.data import unigram_entropy

    losses = [run for _, run in sorted(fifty_steps[0]["losses"].items())]
    assert len(losses) == 50 and all(map(math.isfinite, losses))
    last = sum(losses[-5:]) / 5
    assert last < losses[0] - 1.0, losses
    assert last < unigram_entropy(corpus["prefix"], 512) + 0.3, losses


def test_resume_after_sigkill_is_bitwise_exact(tmp_path, corpus):  # noqa: F811
    n = 4
    full = ok(forked(_train, tiny_config(tmp_path / "a", corpus, [f"train.train_steps={2 * n}"])))
    save = [f"train.train_steps={2 * n}", f"train.save={tmp_path}/b/ckpt", f"train.save_interval={n}"]
    code, status, _ = forked(_train, tiny_config(tmp_path / "b", corpus, save), n + 2)
    assert code == -signal.SIGKILL and status is None
    assert (tmp_path / "b" / "ckpt" / "latest").read_text().strip() == f"step_{n:08d}"
    checkpointing.lock_save_dir(tmp_path / "b" / "ckpt").close()  # the killed run's lock died with it
    resumed = ok(forked(_train, tiny_config(tmp_path / "b", corpus, save + ["train.load=latest"])))
    assert sorted(resumed["losses"]) == list(range(n + 1, 2 * n + 1))
    assert [resumed["losses"][s] for s in range(n + 1, 2 * n + 1)] == [full["losses"][s] for s in
                                                                      range(n + 1, 2 * n + 1)]
    assert torch.equal(resumed["params"], full["params"])


def _stopped(cfg, hook=None):
    """The TrainingStopped message of a run (or "not stopped")."""
    from megatron_based.training.loop import train
    from megatron_based.training.step import TrainingStopped

    try:
        train(cfg, step_hook=hook)
    except TrainingStopped as e:
        return str(e)
    return "not stopped"


def _evaluate(paths):
    """For each checkpoint: (all parameters finite, all logits of a batch finite)."""
    from megatron_based.runtime.parallel import initialize_parallel
    from megatron_based.inference.loader import load_for_inference
    from megatron_based.inference.sample import full_logits

    initialize_parallel(1, 1, 1)
    tokens = torch.randint(0, 500, (2, 32), generator=torch.Generator().manual_seed(0))
    out = []
    for path in paths:
        model = load_for_inference(path)[0]
        out.append((all(bool(torch.isfinite(p).all()) for p in model.parameters()),
                    bool(torch.isfinite(full_logits(model, tokens)).all())))
    return out


@pytest.mark.parametrize("schedule", [
    # the probe: finite parameters after step 1 whose forward overflows (the old guard called them good)
    ["train.lr=1e6", "train.min_lr=1e6", "train.lr_warmup_steps=0", "train.lr_decay_style=constant"],
    # one good step at lr_warmup_init, then the warmup towards 1e30 blows the weights up
    ["train.lr_warmup_init=3e-3", "train.lr=1e30", "train.min_lr=1e30", "train.lr_warmup_steps=4"],
], ids=["lr=1e6", "warmup-to-1e30"])
def test_a_blow_up_is_never_saved_or_called_good(tmp_path, corpus, schedule):  # noqa: F811
    """The non-finite steps are skipped and counted, the run stops after train.max_nonfinite_steps in a row, and
    every checkpoint on disk, ``latest`` and the one the message calls good among them, has finite parameters that
    give finite logits."""
    cfg = tiny_config(tmp_path, corpus, schedule + ["train.max_nonfinite_steps=2", f"train.save={tmp_path}/ckpt",
                                                    "train.save_interval=1", "train.clip_grad=0"])
    message = ok(forked(_stopped, cfg))
    assert re.search(r"non-finite (steps in a row|parameters)|are non-finite", message), message
    good = message.rsplit("the last good checkpoint is ", 1)[1].split(" ")[0]
    saved = sorted((tmp_path / "ckpt").glob("step_*"))
    latest = tmp_path / "ckpt" / "latest"
    if schedule[0].startswith("train.lr_warmup_init"):
        assert good == str(tmp_path / "ckpt" / "step_00000001"), message
    if good == "none":
        assert not latest.exists() and not saved
    else:
        assert latest.read_text().strip() == Path(good).name == saved[-1].name
        assert ok(forked(_evaluate, [str(p) for p in saved])) == [(True, True)] * len(saved)


@pytest.mark.parametrize("clip_grad", [1.0, 0.0])
def test_a_non_finite_gradient_skips_the_update(tmp_path, corpus, clip_grad):  # noqa: F811
    """A NaN gradient under a finite loss (injected into one parameter's gradient at step 3): no update at all, with
    or without clipping (Megatron computes no norm then); the run goes on from the same parameters."""
    cfg = tiny_config(tmp_path, corpus, [f"train.clip_grad={clip_grad}"])

    def run(cfg):
        from megatron_based.training.loop import train

        seen, handle = {}, []

        def hook(step, loss, model):
            seen[step] = (loss, torch.cat([p.detach().reshape(-1).clone() for p in model.parameters()]))
            if step == 2:
                handle.append(next(model.parameters()).register_hook(lambda g: g * float("nan")))
            if step == 3:
                handle.pop().remove()

        summary = train(cfg, step_hook=hook)
        return summary, {s: loss for s, (loss, _) in seen.items()}, torch.equal(seen[3][1], seen[2][1]), \
            torch.equal(seen[4][1], seen[3][1]), bool(torch.isfinite(seen[8][1]).all())

    summary, losses, unchanged, updated_after, finite = ok(forked(run, cfg))
    assert summary["skipped_steps"] == 1 and all(map(math.isfinite, losses.values())), (summary, losses)
    assert unchanged and not updated_after and finite


def test_non_finite_parameters_are_never_saved(tmp_path, corpus):  # noqa: F811
    """Parameters that turned non-finite in an update (an inf written into one after step 3) stop the run at the
    next save without saving them; ``latest`` stays at the last good checkpoint, which the message names."""
    cfg = tiny_config(tmp_path, corpus, [f"train.save={tmp_path}/ckpt", "train.save_interval=1"])

    def poison(step, loss, model):
        if step == 3:
            with torch.no_grad():
                next(model.parameters()).view(-1)[0] = float("inf")

    message = ok(forked(_stopped, cfg, poison))
    assert message == (f"the parameters after step 3 are non-finite, so they were not saved; the last good checkpoint "
                       f"is {tmp_path}/ckpt/step_00000002")
    assert (tmp_path / "ckpt" / "latest").read_text().strip() == "step_00000002"
    assert not (tmp_path / "ckpt" / "step_00000003").exists()


def test_fuse_torch_adam_same_steps_and_moves_step_counters():
    """torch's fused AdamW (what fuse_torch_adam switches Megatron's fallback optimizer to) takes the same steps as
    the foreach one it replaces, here on CPU over 3 steps with weight decay; step counters saved on the CPU move
    to the parameters' device."""
    from megatron_based.training.optimizer import fuse_torch_adam

    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(7, 5)), torch.nn.Parameter(torch.randn(5))]
    copies = [torch.nn.Parameter(p.detach().clone()) for p in params]
    ref = torch.optim.AdamW([{"params": params[:1]}, {"params": params[1:], "weight_decay": 0.0}], lr=1e-2,
                            weight_decay=0.1, foreach=True)

    class Wrapped:  # the shape of a Megatron optimizer: the torch optimizer under .optimizer
        optimizer = torch.optim.AdamW([{"params": copies[:1]}, {"params": copies[1:], "weight_decay": 0.0}],
                                      lr=1e-2, weight_decay=0.1)

    chained = type("Chained", (), {"chained_optimizers": [Wrapped, object()]})()
    for step in range(3):
        for a, b in zip(params, copies):
            a.grad = torch.randn_like(a)
            b.grad = a.grad.clone()
        ref.step()
        if step == 0:  # after one step the state holds CPU step counters
            assert fuse_torch_adam(chained) == 2
            assert all(g["fused"] and not g["foreach"] for g in Wrapped.optimizer.param_groups)
        Wrapped.optimizer.step()
    for a, b in zip(params, copies):
        torch.testing.assert_close(b, a, rtol=1e-6, atol=1e-7)
    assert all(Wrapped.optimizer.state[p]["step"].item() == 3 for p in copies)


def test_foreach_multi_tensor_ops_match_megatron_fallbacks():
    """The foreach gradient norm and scaling give what Megatron's Python-loop fallbacks (and amp_C) give, and
    use_foreach_multi_tensor_ops swaps them in where neither TransformerEngine nor apex is installed."""
    from megatron.core import utils
    from megatron.core.optimizer import clip_grads, optimizer

    from megatron_based.training.optimizer import _foreach_l2_norm, _foreach_scale, use_foreach_multi_tensor_ops

    g = torch.Generator().manual_seed(0)
    grads = [torch.randn(*shape, generator=g) * s for shape, s in (((37, 5), 1.0), ((11,), 1e3), ((3, 2, 7), 1e-3))]
    total, per = _foreach_l2_norm(0, None, [grads], True)
    ref = torch.cat([t.double().flatten() for t in grads]).norm()
    assert total.shape == (1,) and total.dtype == torch.float32
    assert abs(total.item() - ref.item()) <= 1e-6 * ref.item()
    assert torch.allclose(per.double(), torch.stack([t.double().norm() for t in grads]), rtol=1e-6)
    assert _foreach_l2_norm(0, None, [grads], False)[1] is None
    bf16 = [t.bfloat16() for t in grads]  # bf16 gradients: norms accumulated in fp32
    assert abs(_foreach_l2_norm(0, None, [bf16], False)[0].item() - ref.item()) <= 1e-2 * ref.item()
    src, dst = [t.clone() for t in grads], [torch.empty_like(t) for t in grads]
    _foreach_scale(0, None, [src, dst], 0.25)  # out of place, like local_multi_tensor_scale
    want = [t.clone() for t in grads]
    utils.local_multi_tensor_scale(0, None, [grads, want], 0.25)
    assert all(torch.equal(a, b) for a, b in zip(dst, want)) and all(torch.equal(a, b) for a, b in zip(src, grads))
    _foreach_scale(0, None, [src, src], 0.25)  # in place (how clip_grad_by_total_norm_fp32 calls it)
    assert all(torch.equal(a, b) for a, b in zip(src, want))
    saved = (clip_grads.l2_norm_impl, clip_grads.multi_tensor_scale_impl, optimizer.multi_tensor_scale_impl)
    try:
        if saved[0] is utils.local_multi_tensor_l2_norm:  # no TE / apex here
            assert use_foreach_multi_tensor_ops()
            assert clip_grads.l2_norm_impl is _foreach_l2_norm
            assert clip_grads.multi_tensor_scale_impl is optimizer.multi_tensor_scale_impl is _foreach_scale
        assert not use_foreach_multi_tensor_ops()  # idempotent; never replaces TE's or apex's kernels
    finally:
        clip_grads.l2_norm_impl, clip_grads.multi_tensor_scale_impl, optimizer.multi_tensor_scale_impl = saved


# --- preemption, one run per save directory, --load latest ---------------------------------------------------------

REPO = Path(__file__).parents[2]


def _train_on_rank(rank, world_size, cfg):
    return _train(cfg)


@pytest.mark.parametrize("launcher", ["torchrun", "timeout"])
def test_sigterm_to_the_process_group_saves_then_resumes_bitwise(tmp_path, corpus, launcher):  # noqa: F811
    """Preemption as slurm, ``timeout`` and torchrun deliver it: SIGTERM to whole process groups, helper processes
    included. torchrun passes the SIGTERM it gets on to each worker's process group (2 workers here); coreutils
    ``timeout`` passes it (as on expiry) to its command and its own process group (1 process here). The run gets it
    right after its first periodic save (which started any helper): it finishes the step, saves it and exits,
    leaving no ``.tmp-`` folder. Resumed with train.load=latest, its losses and final parameters are bitwise those
    of an uninterrupted run."""
    n, save, world = 16, tmp_path / "ckpt", 2 if launcher == "torchrun" else 1
    overrides = [f"train.train_steps={n}", "train.save_interval=2"]
    resume_cfg = tiny_config(tmp_path, corpus, overrides + [f"train.save={save}", "train.load=latest"],
                             world_size=world)
    command = ["-m", "megatron_based.training.loop", str(tmp_path / "run.yaml"), *overrides, f"train.save={save}"]
    if launcher == "torchrun":
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", *command]
    else:
        command = ["timeout", "600", sys.executable, *command]
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    watchdog = threading.Timer(180, os.killpg, (proc.pid, signal.SIGKILL))
    watchdog.start()
    lines = []
    try:
        for line in proc.stdout:
            lines.append(line)
            if re.search(r"saved checkpoint \S+step_00000002 ", line):
                os.kill(proc.pid, signal.SIGTERM)  # the launcher: torchrun or timeout
        proc.wait(60)
    finally:
        watchdog.cancel()
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    out = "".join(lines)
    stopped = re.search(r"SIGTERM: stopped at step (\d+) after saving", out)
    assert stopped, out[-3000:]
    step = int(stopped[1])
    assert 2 < step < n, out[-3000:]
    assert (save / "latest").read_text().strip() == f"step_{step:08d}"
    assert not list(save.glob(".tmp-*")) and "BrokenPipeError" not in out
    checkpointing.verify(save / f"step_{step:08d}")

    def run(cfg):
        return run_distributed(_train_on_rank, 2, cfg)[0] if world == 2 else ok(forked(_train, cfg))

    resumed = run(resume_cfg)
    full = run(tiny_config(tmp_path / "full", corpus, overrides[:1], world_size=world))
    assert sorted(resumed["losses"]) == list(range(step + 1, n + 1))
    assert [resumed["losses"][s] for s in range(step + 1, n + 1)] == [full["losses"][s] for s in
                                                                      range(step + 1, n + 1)]
    assert torch.equal(resumed["params"], full["params"])


def test_a_second_run_on_the_same_save_dir_refuses_naming_the_holder(tmp_path, corpus):  # noqa: F811
    """While a run holds train.save (here this test process), another refuses to start and names it; nothing of
    the first run's is touched."""
    cfg = tiny_config(tmp_path, corpus, [f"train.save={tmp_path}/ckpt"])
    lock = checkpointing.lock_save_dir(tmp_path / "ckpt")
    try:
        code, status, payload = forked(_train, cfg)
    finally:
        lock.close()
    assert status == "error", payload
    assert re.fullmatch(rf"CheckpointError: {re.escape(str(tmp_path))}/ckpt is in use by another training run \(pid "
                        rf"{os.getpid()} on {re.escape(socket.gethostname())} since "
                        r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\); wait for it to end, or set train.save to another directory",
                        payload.splitlines()[0]), payload
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == [".lock"]
    assert ok(forked(_train, cfg))["summary"]["step"] == 8  # free again


def test_two_runs_started_together_one_refuses(tmp_path, corpus):  # noqa: F811
    """The issue's probe: two runs on one save directory at the same moment. One trains and saves; the other stops
    with the lock error (not a FileNotFoundError from the other's save)."""
    cfg = tiny_config(tmp_path, corpus, [f"train.save={tmp_path}/ckpt"])
    ctx = mp.get_context("fork")
    q = ctx.Queue()
    procs = [ctx.Process(target=_child, args=(_train, (cfg,), q)) for _ in range(2)]
    for p in procs:
        p.start()
    results = sorted((q.get(timeout=120) for _ in procs), key=lambda r: r[0])
    for p in procs:
        p.join(30)
    (error, message), (status, payload) = results
    assert error == "error" and status == "ok", results
    assert "is in use by another training run (pid" in message.splitlines()[0], message
    assert from_bytes(payload)["summary"]["checkpoint"] == f"{tmp_path}/ckpt/step_00000008"


def test_load_latest_needs_a_latest_and_auto_starts_fresh(tmp_path, corpus):  # noqa: F811
    """train.load=latest on a save directory without ``latest`` is an error before anything is written;
    train.load=auto starts fresh there, and on the next start resumes (re-saving the final step, atomically)."""
    base = [f"train.save={tmp_path}/ckpt"]
    code, status, payload = forked(_train, tiny_config(tmp_path, corpus, base + ["train.load=latest"]))
    assert status == "error" and payload.splitlines()[0] == (
        f"CheckpointError: train.load=latest but {tmp_path}/ckpt/latest does not exist; to start fresh drop --load "
        "(train.load=null), or use train.load=auto to resume when there is a checkpoint and start fresh when there is "
        "none"), payload
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == [".lock"]
    auto = tiny_config(tmp_path, corpus, base + ["train.load=auto"])
    assert sorted(ok(forked(_train, auto))["losses"]) == list(range(1, 9))
    again = ok(forked(_train, auto))
    assert again["losses"] == {} and again["summary"]["checkpoint"] == f"{tmp_path}/ckpt/step_00000008"
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == [".lock", "latest", "step_00000008"]
    assert checkpointing.verify(tmp_path / "ckpt" / "step_00000008")["step"] == 8
