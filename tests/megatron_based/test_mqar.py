"""MQAR: Zoology's generator (layout and power-law query slots), the no-MLP models and their state sizes, training
and checkpoints, and the sweep's smoke run."""
from __future__ import annotations

import json

import pytest
import torch

from based_kernels.taylor_attention.ops import STEP_BUFFER

from tests.distributed import run_distributed


def test_mqar_generator_layout():
    """Zoology's layout at the published size: pairs, then each key queried once at the first token of a two-token
    slot, its value as the label there and nowhere else, filler 0 elsewhere."""
    from megatron_based.tasks.mqar import IGNORE, MQARTask, mqar_batch

    task = MQARTask()  # the published defaults
    assert (task.vocab_size, task.seq_len, task.num_kv_pairs, task.power_a, task.random_fill) == (
        8192, 256, 16, 0.01, False)
    N, T, D, V, half = 500, 256, 16, 8192, 4096
    x, y = mqar_batch(task, N, torch.Generator().manual_seed(0))
    assert x.shape == y.shape == (N, T) and x.dtype == y.dtype == torch.long
    for xs, ys in zip(x.tolist(), y.tolist()):
        keys, values = xs[0: 2 * D: 2], xs[1: 2 * D: 2]
        assert len(set(keys)) == D and all(1 <= k < half for k in keys)  # distinct keys from [1, V/2)
        assert len(set(values)) == D and all(half <= v < V for v in values)  # distinct values from [V/2, V)
        assert ys[: 2 * D] == [IGNORE] * (2 * D)  # nothing to recall inside the context
        queries = [t for t in range(T) if ys[t] != IGNORE]
        assert len(queries) == D and all((t - 2 * D) % 2 == 0 for t in queries)  # one label per key, slot starts
        assert sorted(xs[t] for t in queries) == sorted(keys)  # every key queried once
        assert all(ys[t] == values[keys.index(xs[t])] for t in queries)  # the label is the key's value
        assert all(xs[t] == 0 for t in set(range(2 * D, T)) - set(queries))  # filler 0 elsewhere
    assert task.chance == 1 / 4096 and task.num_slots == 112
    # random_fill: the filler is uniform over the whole vocabulary; pairs, queries and labels keep their layout
    xr, yr = mqar_batch(MQARTask(random_fill=True), N, torch.Generator().manual_seed(0))
    filler = xr[:, 2 * D:][yr[:, 2 * D:] == IGNORE]
    assert filler.min() >= 0 and filler.max() < V and filler.float().mean().sub(V / 2).abs() < 100
    assert ((yr != IGNORE).sum(1) == D).all()
    with pytest.raises(ValueError, match="seq_len"):
        MQARTask(vocab_size=40, seq_len=15, num_kv_pairs=4)
    with pytest.raises(ValueError, match="vocab_size"):
        MQARTask(vocab_size=8, seq_len=64, num_kv_pairs=4)


def test_mqar_query_gaps_follow_the_power_law():
    """Slots are drawn one key after the other, p(i) ∝ i^(a-1), a = 0.01: the first key's slot follows p exactly
    (mean ~20.5 of 112 slots, a fifth of them in the first slot); later keys, drawn from what is left, sit later."""
    from megatron_based.tasks.mqar import IGNORE, MQARTask, mqar_batch, query_gap_weights

    task = MQARTask()
    D, N = task.num_kv_pairs, 4000
    x, y = mqar_batch(task, N, torch.Generator().manual_seed(1))
    p = query_gap_weights(task)
    assert p.shape == (112,) and abs(float(p.sum()) - 1) < 1e-12
    assert torch.allclose(p[1:] / p[:-1], (torch.arange(2, 113.) / torch.arange(1, 112.)).double() ** (0.01 - 1))
    # slot of each key (keys in context order): where its query sits
    keys = x[:, 0: 2 * D: 2]
    query_pos = (y != IGNORE)
    slot = torch.full((N, D), -1)
    for j in range(D):
        hit = (x == keys[:, j: j + 1]) & query_pos
        slot[:, j] = (hit.float().argmax(1) - 2 * D) // 2
    assert (slot >= 0).all() and (slot < 112).all()
    i = torch.arange(112, dtype=torch.float64)
    mean, var = float((i * p).sum()), float((i * i * p).sum() - (i * p).sum() ** 2)
    first = slot[:, 0].double()
    assert abs(float(first.mean()) - mean) < 4 * (var / N) ** 0.5, (float(first.mean()), mean)
    p0 = float(p[0])
    assert abs(float((first == 0).double().mean()) - p0) < 4 * (p0 * (1 - p0) / N) ** 0.5
    means = slot.double().mean(0)
    assert means[0] < means[D // 2] < means[-1]  # later draws take what the earlier left
    # uniform slots with power_a = 1
    assert torch.allclose(query_gap_weights(MQARTask(power_a=1.0)), torch.full((112,), 1 / 112, dtype=torch.float64))


def _models_worker(rank, world):
    from megatron_based.runtime.parallel import initialize_parallel
    from megatron_based.tasks.mqar import (MQARTask, build_mqar_model, evaluate_mqar, mqar_batch, mqar_loss,
                                           mqar_state_size, state_bytes_per_sequence)

    initialize_parallel(1)
    torch.manual_seed(0)
    out = {}
    task = MQARTask(vocab_size=64, seq_len=32, num_kv_pairs=4)
    x, y = mqar_batch(task, 8, torch.Generator().manual_seed(0))
    for mlp in (False, True):
        model = build_mqar_model("CLSAHZ", hidden_size=32, num_heads=2, feature_dim=8, swa_window=8, vocab_size=64,
                                 seq_len=32, mlp=mlp)
        names = [n for n, _ in model.named_parameters()]
        full = model(x, torch.arange(32).expand(8, 32), attention_mask=None)  # [b, s, V]: the whole forward
        rows, cols = (y != -100).nonzero(as_tuple=True)
        from megatron_based.tasks.mqar import mqar_logits

        logits, targets, _ = mqar_logits(model, x, y)
        positions = (y != -100).nonzero()[:, 1].view(8, 4)  # given instead of found: the same rows, same order
        given = mqar_logits(model, x, y, positions)
        out[mlp] = {"mlp_params": sum(".mlp." in n for n in names),
                    "query_logits_match": torch.allclose(logits, full[rows, cols].float(), atol=1e-5),
                    "targets": torch.equal(targets, y[rows, cols]), "loss": float(mqar_loss(model, x, y)),
                    "given_positions": torch.equal(given[0], logits) and torch.equal(given[1], targets)
                    and torch.equal(given[2], rows),
                    "recall": evaluate_mqar(model, x, y, batch_size=3),
                    "bytes": state_bytes_per_sequence(model, 32),
                    "formula": mqar_state_size("CLSAHZ", hidden_size=32, feature_dim=8, num_heads=2, seq_len=32,
                                               swa_window=8)}
    return out


def test_mqar_models_no_mlp_query_logits_and_state_size():
    """The published models have no MLP (Megatron's IdentityOp in the MLP slots); the output layer at the query
    positions only gives the full forward's logits there; the state-size formula counts the generation caches."""
    out = run_distributed(_models_worker, 1)[0]
    assert out[False]["mlp_params"] == 0 and out[True]["mlp_params"] > 0
    for r in out.values():
        assert r["query_logits_match"] and r["targets"] and r["given_positions"]
        assert 3.0 < r["loss"] < 5.5 and 0 <= r["recall"] <= 1  # ~ln 64 at initialisation
        # fp32 caches, and the L layer's decode buffer (2 heads, f 8, d_v 16) with its int32 counts
        assert r["bytes"] == 4 * r["formula"] + 2 * (STEP_BUFFER * (8 + 16) * 4 + 4)
    # C 2 x 64, L (1 + 8 + 36) x (32 + 2) (the symmetric map), S 2 x 9 x 32, A 2 x 32 x 32, H 32 x 32, Z 2 x 32
    assert out[False]["formula"] == 128 + 45 * 34 + 576 + 2048 + 1024 + 64


def _learn_worker(rank, world):
    from megatron_based.runtime.parallel import initialize_parallel
    from megatron_based.tasks.mqar import MQARTask, build_mqar_model, evaluate_mqar, mqar_dataset, train_mqar

    initialize_parallel(1)
    torch.manual_seed(0)
    task = MQARTask(vocab_size=64, seq_len=32, num_kv_pairs=4)
    model = build_mqar_model("CL", hidden_size=64, num_heads=1, feature_dim=8, vocab_size=64, seq_len=32, mlp=False)
    train, test = mqar_dataset(task, 4000, 500)
    before = evaluate_mqar(model, *test)
    history = train_mqar(model, train, test, epochs=4, batch_size=64, lr=3e-3, log=None)
    return before, history, task.chance


@pytest.mark.slow
def test_tiny_based_learns_mqar_above_chance():
    before, history, chance = run_distributed(_learn_worker, 1)[0]
    assert before < 2 * chance
    assert [h["epoch"] for h in history] == [1, 2, 3, 4]
    assert history[-1]["loss"] < history[0]["loss"] - 0.3
    assert history[-1]["accuracy"] > 3 * chance, (history, chance)


GRAPH_PATTERNS = ["ZA", "ZH", "ZL"]  # the sweep's models (megatron_based.tasks.cli.MODELS)


def _graph_runs(patterns):
    """Each pattern's model trained twice from the same weights and data: CUDA-graphed and eager."""
    from megatron_based.tasks.mqar import MQARTask, build_mqar_model, mqar_dataset, train_mqar

    task = MQARTask(vocab_size=64, seq_len=32, num_kv_pairs=4)
    train, test = mqar_dataset(task, 200, 64)  # batch 64: 3 full batches and a partial one of 8 rows per epoch
    kw = dict(hidden_size=32, num_heads=1, feature_dim=8, vocab_size=64, seq_len=32, mlp=False)
    out = {}
    for pattern in patterns:
        graphed, eager = build_mqar_model(pattern, **kw), build_mqar_model(pattern, **kw)
        eager.load_state_dict(graphed.state_dict())
        out[pattern] = {}
        for name, model, cuda_graph in (("graph", graphed, True), ("eager", eager, False)):
            lines = []
            history = train_mqar(model, train, test, epochs=2, batch_size=64, lr=3e-3, seed=1, early_stop=None,
                                 log=lines.append, cuda_graph=cuda_graph)
            out[pattern][name] = {"loss": [h["loss"] for h in history], "lines": lines,
                                  "params": {k: p.detach().cpu().clone() for k, p in model.named_parameters()}}
    return out


@pytest.fixture(scope="module")
def graph_and_eager_runs():
    """Every pattern's graphed and eager run, in this process with its own process group (a worker process would
    spend ~17 s importing on the GPU machine; forked, it could not initialise CUDA after this process did)."""
    from .helpers import in_process_group

    with pytest.MonkeyPatch.context() as mp, in_process_group(mp):
        return _graph_runs(GRAPH_PATTERNS)


@pytest.mark.gpu
@pytest.mark.parametrize("pattern", GRAPH_PATTERNS)
def test_mqar_cuda_graph_trains_like_the_eager_loop(graph_and_eager_runs, pattern):
    """cuda_graph=True (each full batch one graph replay, the partial last batch eager, the cosine learning rate
    written into the graph's tensor each epoch) matches the eager loop from the same weights and data order: the
    per-epoch losses and the final parameters within rtol 1e-5 (fp32; not bitwise: the graphed fused AdamW reads
    the learning rate as an fp32 tensor, the eager one as a double)."""
    out = graph_and_eager_runs[pattern]
    graph, eager = out["graph"], out["eager"]
    assert graph["lines"][0].startswith("CUDA graph: one replay per full batch of 64"), graph["lines"]
    assert not any("CUDA graph" in line for line in eager["lines"])
    assert graph["loss"] == pytest.approx(eager["loss"], rel=1e-5)
    assert graph["loss"][1] < graph["loss"][0]  # it trained
    assert graph["params"].keys() == eager["params"].keys()
    for k, v in graph["params"].items():
        torch.testing.assert_close(v, eager["params"][k], rtol=1e-5, atol=1e-6, msg=k)


def _resume_runs(state_dir, cuda_graph):
    """One 3-epoch run uninterrupted, and the same run killed after its second epoch's line and continued from its
    state file by a model with other weights; then the finished file again, and the file under other settings."""
    from megatron_based.tasks.mqar import MQARTask, TrainingStateError, build_mqar_model, mqar_dataset, train_mqar

    task = MQARTask(vocab_size=64, seq_len=32, num_kv_pairs=4)
    train, test = mqar_dataset(task, 200, 64)  # 3 full batches of 64 and a partial one of 8 rows per epoch
    kw = dict(hidden_size=32, num_heads=1, feature_dim=8, vocab_size=64, seq_len=32, mlp=False)
    device = "cuda" if cuda_graph else "cpu"
    torch.manual_seed(0)
    first = build_mqar_model("ZH", **kw).to(device)
    init = {k: v.clone() for k, v in first.state_dict().items() if torch.is_tensor(v)}
    run = dict(epochs=3, batch_size=64, lr=3e-3, seed=1, early_stop=None, cuda_graph=cuda_graph)
    whole = train_mqar(first, train, test, log=None, state=state_dir / "whole.pt", **run)
    out = {"whole": whole, "whole_params": {k: v.detach().cpu() for k, v in first.named_parameters()}}

    def kill_after_epoch_2(line):
        if line.startswith("epoch 2/3"):
            raise KeyboardInterrupt("killed")

    killed = build_mqar_model("ZH", **kw).to(device)
    killed.load_state_dict(init, strict=False)
    try:
        train_mqar(killed, train, test, log=kill_after_epoch_2, state=state_dir / "cut.pt", **run)
    except KeyboardInterrupt:
        pass
    torch.manual_seed(5)
    other = build_mqar_model("ZH", **kw).to(device)  # other weights: the state file must replace them
    lines = []
    out["continued"] = train_mqar(other, train, test, log=lines.append, state=state_dir / "cut.pt", **run)
    out["lines"] = lines
    out["continued_params"] = {k: v.detach().cpu() for k, v in other.named_parameters()}
    again = []
    out["again"] = train_mqar(other, train, test, log=again.append, state=state_dir / "cut.pt", **run)
    out["again_lines"] = again
    errors = []
    for changed in ({"lr": 1e-3}, {"epochs": 4}):
        try:
            train_mqar(other, train, test, log=None, state=state_dir / "cut.pt", **{**run, **changed})
        except TrainingStateError as e:
            errors.append(str(e))
    (state_dir / "junk.pt").write_bytes(b"not a torch file")
    try:
        train_mqar(other, train, test, log=None, state=state_dir / "junk.pt", **run)
    except TrainingStateError as e:
        errors.append(str(e))
    out["errors"] = errors
    return out


def _resume_worker(rank, world, state_dir):
    from pathlib import Path

    from megatron_based.runtime.parallel import initialize_parallel

    initialize_parallel(1)
    return _resume_runs(Path(state_dir), cuda_graph=False)


def _check_resumed(out, state_dir):
    strip = lambda history: [{k: v for k, v in h.items() if k != "seconds"} for h in history]  # noqa: E731
    for key in ("lines", "again_lines"):  # the graphed runs' capture line first
        out[key] = [line for line in out[key] if not line.startswith("CUDA graph: one replay")]
    assert [h["epoch"] for h in out["whole"]] == [1, 2, 3]
    assert out["lines"][0] == f"continuing from {state_dir / 'cut.pt'}: epoch 3 of 3 next", out["lines"]
    assert [line.split()[1] for line in out["lines"][1:]] == ["3/3"]  # only the third epoch ran
    assert strip(out["continued"]) == strip(out["whole"])  # bitwise: losses, accuracies, learning rates
    for k, v in out["whole_params"].items():
        assert torch.equal(out["continued_params"][k], v), k
    assert out["again_lines"] == [f"continuing from {state_dir / 'cut.pt'}: finished after epoch 3"]
    assert strip(out["again"]) == strip(out["whole"])
    lr, epochs, junk = out["errors"]
    assert "cut.pt was saved by a run with lr 0.003, this run has 0.001; remove it or give another --state" in lr
    assert "with epochs 3, this run has 4" in epochs
    assert "junk.pt is not a readable MQAR training state" in junk
    assert not list(state_dir.glob("*.tmp"))


def test_mqar_training_state_continues_a_killed_run_bitwise(tmp_path):
    """train_mqar(state=...): a run killed after an epoch continues from the state file (weights, AdamW, the
    shuffling generator, the RNG, the history) as if it had not stopped: the same per-epoch losses and accuracies and
    the same final weights, bitwise (CPU, eager). A finished state returns its history without training; a state
    saved under other settings, or a file that is no state, is refused with one line naming it."""
    [out] = run_distributed(_resume_worker, 1, str(tmp_path))
    _check_resumed(out, tmp_path)


@pytest.mark.gpu
def test_mqar_training_state_continues_a_graphed_run_bitwise(tmp_path):
    """The same with the CUDA-graphed step: the continued run writes the saved AdamW state into the tensors the
    captured step reads (its capture zeroes them), so the graphed run continues bitwise too."""
    from .helpers import in_process_group

    with pytest.MonkeyPatch.context() as mp, in_process_group(mp):
        out = _resume_runs(tmp_path, cuda_graph=True)
    _check_resumed(out, tmp_path)


def test_mqar_cuda_graph_needs_a_cuda_model():
    """cuda_graph=True on a CPU model is an error (not silently eager); None means on only on CUDA."""
    from megatron_based.tasks.mqar import train_mqar

    data = (torch.zeros(4, 8, dtype=torch.long), torch.full((4, 8), -100))
    with pytest.raises(ValueError, match="cuda_graph=True needs the model on a CUDA device"):
        train_mqar(torch.nn.Linear(2, 2), data, data, epochs=1, log=None, cuda_graph=True)


def _mqar(*args, cwd):
    import subprocess
    import sys

    return subprocess.run([sys.executable, "-m", "megatron_based.tasks.mqar", *args], cwd=cwd, capture_output=True,
                          text=True, timeout=300)


def _recall(stdout: str) -> float:
    return float(stdout.split("MQAR recall ")[1].split()[0])


def test_mqar_checkpoint_carries_its_model(tmp_path):
    """eval rebuilds the trained model from the checkpoint alone (swa_window 8, not the default 16, and seq_len 32),
    and a --config whose model section lacks a key the model needs is refused by name; train --json writes the
    result with one history entry per epoch."""
    train = _mqar("train", "--pattern", "CLS", "--hidden-size", "32", "--num-heads", "4", "--feature-dim", "8",
                  "--swa-window", "8", "--mlp", "--vocab-size", "64", "--seq-len", "32", "--num-kv-pairs", "4",
                  "--num-train", "64", "--batch-size", "32", "--epochs", "2", "--num-examples", "64",
                  "--save", "ckpt.pt", "--json", "result.json", cwd=tmp_path)
    assert train.returncode == 0, train.stderr
    assert train.stdout.count("test accuracy") == 2, train.stdout  # one line per epoch
    saved = torch.load(tmp_path / "ckpt.pt", weights_only=True)
    assert saved["model"] == {"layer_pattern": "CLS", "hidden_size": 32, "num_attention_heads": 4, "feature_dim": 8,
                              "swa_window": 8, "vocab_size": 64, "seq_length": 32, "mlp": True}
    result = json.loads((tmp_path / "result.json").read_text())
    assert abs(result["accuracy"] - result["history"][-1]["accuracy"]) < 1e-4 and result["epochs_run"] == 2
    assert result["task"] == {"vocab_size": 64, "seq_len": 32, "num_kv_pairs": 4, "power_a": 0.01,
                              "random_fill": False}
    assert result["state_size"] == 2 * 64 + 45 * 36 + 2 * 9 * 32  # C, L (4 heads; 1 + 8 + 36 rows), S
    ev = _mqar("eval", "--checkpoint", "ckpt.pt", "--num-examples", "64", "--num-kv-pairs", "4", cwd=tmp_path)
    assert ev.returncode == 0, ev.stderr
    assert _recall(ev.stdout) == _recall(train.stdout)  # same model, same test sequences
    assert "sequences of 32 tokens" in ev.stdout

    (tmp_path / "cfg.yaml").write_text("model:\n  layer_pattern: CLS\n  hidden_size: 32\n  num_attention_heads: 4\n"
                                       "  feature_dim: 8\n  vocab_size: 64\n  seq_length: 32\n")
    bad = _mqar("eval", "--config", "cfg.yaml", "--checkpoint", "ckpt.pt", cwd=tmp_path)
    assert bad.returncode == 2 and "lacks ['swa_window']" in bad.stderr, bad.stderr
    torch.save(saved["state_dict"], tmp_path / "bare.pt")
    # refused by load_mqar_checkpoint, whose ConfigError the CLI prints in one line with exit 2 (as for cfg.yaml)
    from megatron_based.model.config import ConfigError
    from megatron_based.tasks.mqar import load_mqar_checkpoint

    with pytest.raises(ConfigError, match="carries no model configuration"):
        load_mqar_checkpoint(str(tmp_path / "bare.pt"))
    (tmp_path / "cfg.yaml").write_text((tmp_path / "cfg.yaml").read_text() + "  swa_window: 8\n")
    legacy = _mqar("eval", "--config", "cfg.yaml", "--checkpoint", "bare.pt", "--num-examples", "64",
                   "--num-kv-pairs", "4", cwd=tmp_path)
    assert legacy.returncode == 0, legacy.stderr
    assert _recall(legacy.stdout) == _recall(train.stdout)  # a bare state dict with a complete --config


def test_mqar_sweep_smoke(tmp_path):
    """benchmarks/mqar_sweep.py --smoke runs its whole pipeline on CPU (3 tiny runs of 1 epoch) and writes the JSON,
    the markdown table (between its markers, into an existing document) and the SVG plot; a call cut by
    --time-limit records nothing of its unfinished runs, a later call runs them (--state-dir: each keeps its training
    state there until it is done), the next skips the runs already in the JSON, and --report-only rewrites the
    table from it."""
    import subprocess
    import sys
    import xml.etree.ElementTree as ET
    from pathlib import Path

    repo = Path(__file__).resolve().parents[2]
    (tmp_path / "mqar.md").write_text("# MQAR\n\nbefore\n\n<!-- mqar-sweep:begin -->\nold\n<!-- mqar-sweep:end -->\n"
                                      "\nafter\n")
    sweep = [sys.executable, str(repo / "benchmarks" / "mqar_sweep.py"), "--smoke", "--out-dir", str(tmp_path)]
    cut = subprocess.run(sweep + ["--time-limit", "1"], cwd=repo, capture_output=True, text=True, timeout=300)
    assert cut.returncode == 0 and "0 runs done, 0 skipped, 3 still to run" in cut.stdout, cut.stdout + cut.stderr
    assert json.loads((tmp_path / "mqar.json").read_text())["runs"] == {}  # stopped runs are not recorded
    assert (tmp_path / "mqar.md").read_text().count("not yet run on GPU") == 3
    states = tmp_path / "states"  # each run keeps its training state there; a finished run's is removed
    first = subprocess.run(sweep + ["--state-dir", str(states)], cwd=repo, capture_output=True, text=True, timeout=300)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    assert states.is_dir() and not list(states.iterdir())
    assert first.stdout.count("epoch 1/1") == 3 and "3 runs done" in first.stdout, first.stdout[-3000:]
    data = json.loads((tmp_path / "mqar.json").read_text())
    assert sorted(data["runs"]) == ["attention-d16-lr0.003", "baseconv-d16-lr0.003", "based-d16-f4-lr0.003"]
    assert data["meta"]["settings"]["epochs"] == 1 and data["meta"]["device"] == "cpu"
    for run in data["runs"].values():
        assert 0 <= run["accuracy"] <= 1 and run["epochs_run"] == 1 and run["mlp"] is False
        assert run["num_attention_heads"] == 1 and run["task"]["seq_len"] == 32
    # the sweep's state sizes (its own formula, no Megatron import) are the runs' (mqar_state_size's)
    sys.path.insert(0, str(repo / "benchmarks"))
    try:
        import mqar_sweep
    finally:
        sys.path.remove(str(repo / "benchmarks"))
    for cell in mqar_sweep.grid(smoke=True):
        run = data["runs"][mqar_sweep.run_key(cell, 3e-3)]
        assert mqar_sweep.state_size(cell, data["meta"]["settings"]) == run["state_size"]
        command = mqar_sweep.command(cell, 3e-3, data["meta"]["settings"], Path("r.json"), state=states / "s.pt")
        assert command[command.index("--state") + 1] == str(states / "s.pt")
    for cell in mqar_sweep.grid(smoke=False):  # and at the published size, against the model's formula
        from megatron_based.tasks.mqar import mqar_state_size

        assert mqar_sweep.state_size(cell, mqar_sweep.FULL) == mqar_state_size(
            mqar_sweep.MODELS[cell["model"]], hidden_size=cell["d"], feature_dim=cell["f"] or 16, num_heads=1,
            seq_len=256)
    doc = (tmp_path / "mqar.md").read_text()
    assert doc.startswith("# MQAR\n\nbefore\n\n<!-- mqar-sweep:begin -->") and doc.endswith("-->\n\nafter\n")
    assert "old" not in doc and doc.count("| BASED (ZL) | 16 | 4 |") == 1 and "not yet run" not in doc
    assert "![MQAR recall vs state size](mqar_recall_vs_state.svg)" in doc
    svg = ET.parse(tmp_path / "mqar_recall_vs_state.svg").getroot()
    assert svg.tag.endswith("svg") and len(svg.findall("{http://www.w3.org/2000/svg}circle")) >= 3
    again = subprocess.run(sweep, cwd=repo, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0 and "0 runs to do" in again.stdout, again.stdout[-2000:] + again.stderr[-2000:]
    (tmp_path / "mqar.md").unlink()
    report = subprocess.run(sweep + ["--report-only"], cwd=repo, capture_output=True, text=True, timeout=120)
    assert report.returncode == 0, report.stderr[-2000:]
    assert (tmp_path / "mqar.md").read_text().count("| attention (ZA) | 16 |") == 1
    # a run's epoch lines (as the sweep reads them from its output) carry its test accuracy: a run the time limit
    # stops is recorded from its last one under "cut", shown marked and never as a finished run of its cell
    line = next(x for x in first.stdout.splitlines() if "[based-d16-f4-lr0.003] epoch 1/1" in x)
    assert mqar_sweep.epoch_progress(line) == {"epochs_run": 1, "epochs": 1, "accuracy": pytest.approx(
        data["runs"]["based-d16-f4-lr0.003"]["accuracy"], abs=5e-5)}
    cut = {**data, "runs": {k: r for k, r in data["runs"].items() if not k.startswith("based")},
           "cut": {"based-d16-f4-lr0.003": {"epochs_run": 3, "epochs": 64, "accuracy": 0.5, "lr": 3e-3}}}
    rows = mqar_sweep.summarize(cut, mqar_sweep.grid(smoke=True), data["meta"]["settings"])
    table = mqar_sweep.markdown(rows, cut, data["meta"]["settings"])
    based = next(x for x in table.splitlines() if x.startswith("| BASED (ZL) | 16 | 4 |"))
    assert based.endswith("| 0.500³ | 0.003 | 3 of 64³ |  |") and "³ Not a result" in table, table
    assert "<rect" in mqar_sweep.svg(rows, data["meta"]["settings"]).split("published")[0]


def test_mqar_bad_inputs_fail_in_one_line_before_training(tmp_path, capsys):
    """Checked before the process group and the model: a --save, --json or --state whose folder does not exist (they were
    written after the training, which was lost), sizes below 1 and pairs that do not fit (tracebacks, some after a
    model build); and a --checkpoint that is not a torch file is refused by name (was torch's traceback)."""
    import torch.distributed as dist

    from megatron_based.model.config import ConfigError
    from megatron_based.tasks.mqar import load_mqar_checkpoint, main

    small = ["--vocab-size", "64", "--seq-len", "32", "--num-kv-pairs", "4", "--epochs", "1"]
    for argv, message in [
        ([*small, "--save", str(tmp_path / "out" / "m.pt")],
         f"--save {tmp_path}/out/m.pt: its folder {tmp_path}/out does not exist; create it first"),
        ([*small, "--json", str(tmp_path / "out" / "r.json")],
         f"--json {tmp_path}/out/r.json: its folder {tmp_path}/out does not exist; create it first"),
        ([*small, "--state", str(tmp_path / "out" / "s.pt")],
         f"--state {tmp_path}/out/s.pt: its folder {tmp_path}/out does not exist; create it first"),
        ([*small, "--hidden-size", "0"], "--hidden-size must be >= 1, got 0"),
        ([*small, "--batch-size", "0"], "--batch-size must be >= 1, got 0"),
        ([*small[:-3], "40", *small[-2:]], "seq_len (32) must be >= 4 * num_kv_pairs (160)"),
    ]:
        assert main(["train", *argv]) == 2, argv
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and message in err, (argv, err)
    assert main(["eval", "--checkpoint", str(tmp_path / "none.pt")]) == 2
    assert f"--checkpoint {tmp_path}/none.pt does not exist" in capsys.readouterr().err
    assert not dist.is_initialized()
    text = tmp_path / "notes.txt"
    text.write_text("not a checkpoint\n")
    with pytest.raises(ConfigError, match=f"^{text} is not a torch file of weights that torch.load"):
        load_mqar_checkpoint(str(text))


def test_embed_dropout_drops_embeddings_only_in_training():
    """--embed-dropout (Zoology's embed_dropout): the embedding dropout module gets the rate, the layers' residual
    dropout stays 0 (Zoology's resid_dropout); training-mode forwards differ, eval-mode ones do not, and with rate 0
    the model equals the default one; a rate outside [0, 1) is refused by name."""
    from megatron_based.tasks.mqar import build_mqar_model

    def run(rate):
        kw = dict(hidden_size=32, num_heads=1, feature_dim=8, vocab_size=64, seq_len=32, mlp=False)
        torch.manual_seed(0)
        model = build_mqar_model("ZL", embed_dropout=rate, **kw)
        ids = torch.randint(0, 64, (2, 32), generator=torch.Generator().manual_seed(1))
        pos = torch.arange(32).expand_as(ids)
        assert model.embedding.embedding_dropout.p == rate
        assert model.config.hidden_dropout == 0.0 and model.config.attention_dropout == 0.0
        model.train()
        a, b = model(ids, pos, None), model(ids, pos, None)
        model.eval()
        c, d = model(ids, pos, None), model(ids, pos, None)
        return a, b, c, d

    def worker(rank, world):
        from megatron_based.runtime.parallel import initialize_parallel

        initialize_parallel(1)
        a, b, c, d = run(0.1)
        assert not torch.equal(a, b) and torch.equal(c, d)
        a0, b0, c0, _ = run(0.0)
        assert torch.equal(a0, b0) and torch.equal(c0, c)  # same weights (seed 0): eval equals with and without
        with pytest.raises(ValueError, match="embed_dropout must be in"):
            build_mqar_model("ZL", hidden_size=32, num_heads=1, vocab_size=64, seq_len=32, embed_dropout=1.0)
        return True

    assert run_distributed(worker, 1) == [True]


def test_cli_rejects_a_bad_embed_dropout(capsys):
    """Refused in one line before the process group and the model (main's exit 2 is the process's: the
    subprocess refusals of test_mqar_checkpoint_carries_its_model)."""
    import torch.distributed as dist

    from megatron_based.tasks.mqar import main

    assert main(["train", "--embed-dropout", "1.5", "--epochs", "1"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--embed-dropout must be in [0, 1); got 1.5" in err, err
    assert not dist.is_initialized()
