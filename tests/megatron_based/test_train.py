"""Training entry point: config validation before any process group, preprocess -> dataset -> steps end to end,
loss going down, and a bitwise-exact resume after SIGKILL."""
from __future__ import annotations

import io
import math
import multiprocessing as mp
import os
import queue as queue_mod
import signal
import time

import pytest
import torch
import torch.distributed as dist
import yaml

from megatron_based.config import ConfigError
from megatron_based.training_config import load_config

from ..distributed import _free_port
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


def _child(fn, args, q, port):
    os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
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
    p = ctx.Process(target=_child, args=(fn, args, q, _free_port()))
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
    from megatron_based.train import train

    losses, params = {}, {}

    def hook(step, loss, model):
        losses[step] = loss
        if step == kill_at:
            os.kill(os.getpid(), signal.SIGKILL)
        params["final"] = torch.cat([p.detach().reshape(-1).clone() for p in model.parameters()])

    summary = train(cfg, step_hook=hook)
    return {"losses": losses, "params": params["final"], "summary": summary}


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
    (["trainlr=1"], 1, r"override 'trainlr=1' must look like section.key=value"),
])
def test_invalid_configs_fail_early_naming_the_key(tmp_path, corpus, overrides, world, message):  # noqa: F811
    with pytest.raises(ConfigError, match=message):
        tiny_config(tmp_path, corpus, overrides, world_size=world)
    assert not dist.is_initialized()


def test_cli_reports_config_errors_without_starting(tmp_path, corpus, capsys):  # noqa: F811
    from megatron_based.train import main

    tiny_config(tmp_path, corpus)
    assert main([str(tmp_path / "run.yaml"), "train.micro_batch_size=3"]) == 2
    assert "train.global_batch_size (4) must be divisible by train.micro_batch_size (3)" in capsys.readouterr().err
    assert not dist.is_initialized()


def test_tiny_yaml_is_a_valid_run_config(tmp_path, corpus):  # noqa: F811
    from pathlib import Path

    cfg = load_config(Path(__file__).parents[2] / "configs" / "tiny.yaml",
                      [f"data.path=[{corpus['prefix']}]", f"data.tokenizer_model={corpus['tokenizer']}"])
    assert cfg.model_spec().config.layer_pattern == "CLSC" and cfg.num_microbatches == 2


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
    from megatron_based.data import unigram_entropy

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
    resumed = ok(forked(_train, tiny_config(tmp_path / "b", corpus, save + ["train.load=latest"])))
    assert sorted(resumed["losses"]) == list(range(n + 1, 2 * n + 1))
    assert [resumed["losses"][s] for s in range(n + 1, 2 * n + 1)] == [full["losses"][s] for s in
                                                                      range(n + 1, 2 * n + 1)]
    assert torch.equal(resumed["params"], full["params"])


def test_non_finite_steps_are_skipped_then_stop(tmp_path, corpus):  # noqa: F811
    """A learning rate of 1e30 blows the weights up: the non-finite steps are skipped and counted, and the run
    stops after train.max_nonfinite_steps in a row, keeping the last good checkpoint."""
    from megatron_based.train import TrainingStopped

    cfg = tiny_config(tmp_path, corpus, ["train.lr=1e30", "train.min_lr=1e30", "train.lr_warmup_steps=0",
                                         "train.lr_decay_style=constant", "train.max_nonfinite_steps=2",
                                         f"train.save={tmp_path}/ckpt", "train.save_interval=1",
                                         "train.clip_grad=0"])

    def run(cfg):
        try:
            _train(cfg)
        except TrainingStopped as e:
            return str(e)
        return "not stopped"

    message = ok(forked(run, cfg))
    assert "2 non-finite steps in a row" in message
    good = (tmp_path / "ckpt" / "latest").read_text().strip()
    assert good in message and int(good.split("_")[1]) >= 1


def test_fuse_torch_adam_same_steps_and_moves_step_counters():
    """torch's fused AdamW (what fuse_torch_adam switches Megatron's fallback optimizer to) takes the same steps as
    the foreach one it replaces, here on CPU over 3 steps with weight decay; step counters saved on the CPU move
    to the parameters' device."""
    from megatron_based.train import fuse_torch_adam

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

    from megatron_based.train import _foreach_l2_norm, _foreach_scale, use_foreach_multi_tensor_ops

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
