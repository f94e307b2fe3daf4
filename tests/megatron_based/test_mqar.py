"""MQAR: the generator's keys/values/queries are right, and a tiny BASED model learns recall above chance."""
from __future__ import annotations

import pytest
import torch

from tests.distributed import run_distributed


def test_mqar_generator_layout():
    from megatron_based.tasks.mqar import IGNORE, MQARTask, mqar_batch

    task = MQARTask(vocab_size=40, seq_len=37, num_kv_pairs=5)
    x, y = mqar_batch(task, 200, torch.Generator().manual_seed(0))
    assert x.shape == y.shape == (200, 37)
    D, half = 5, 20
    for xs, ys in zip(x.tolist(), y.tolist()):
        keys, values = xs[0: 2 * D: 2], xs[1: 2 * D: 2]
        assert len(set(keys)) == D and all(1 <= k < half for k in keys)
        assert all(half <= v < 40 for v in values)
        assert ys[: 2 * D] == [IGNORE] * (2 * D)  # nothing to recall inside the context
        queries = [t for t in range(2 * D, 37) if ys[t] != IGNORE]
        assert sorted(xs[t] for t in queries) == sorted(keys)  # every key queried once
        for t in queries:
            answer = values[keys.index(xs[t])]
            assert ys[t] == answer and xs[t + 1] == answer  # the value follows its query
        rest = set(range(2 * D, 37)) - set(queries) - {t + 1 for t in queries}
        assert all(xs[t] == 0 for t in rest)  # noise token elsewhere
    # Queries land everywhere in the query region, and pairs differ between examples.
    positions = (y != IGNORE).nonzero()[:, 1]
    assert positions.min() == 2 * D and positions.max() >= 37 - 3
    assert len({tuple(r) for r in x[:, : 2 * D].tolist()}) == 200
    assert task.chance == 1 / 20
    with pytest.raises(ValueError, match="seq_len"):
        MQARTask(vocab_size=40, seq_len=15, num_kv_pairs=4)
    with pytest.raises(ValueError, match="vocab_size"):
        MQARTask(vocab_size=8, seq_len=64, num_kv_pairs=4)


def _learn_worker(rank, world):
    from megatron_based.tasks.mqar import MQARTask, build_mqar_model, evaluate_mqar, mqar_batch, train_mqar
    from megatron_based.runtime.parallel import initialize_parallel

    initialize_parallel(1)
    torch.manual_seed(0)
    task = MQARTask(vocab_size=64, seq_len=32, num_kv_pairs=4)
    model = build_mqar_model("CLS", hidden_size=64, num_heads=4, feature_dim=8, swa_window=8, vocab_size=64,
                             seq_len=32)
    x, y = mqar_batch(task, 500, torch.Generator().manual_seed(1))
    before = evaluate_mqar(model, x, y)
    losses = train_mqar(model, task, steps=150, lr=4e-3, progress=False)
    return before, evaluate_mqar(model, x, y), losses, task.chance


@pytest.mark.slow
def test_tiny_based_learns_mqar_above_chance():
    before, after, losses, chance = run_distributed(_learn_worker, 1)[0]
    assert before < 2 * chance
    assert sum(losses[-10:]) / 10 < sum(losses[:10]) / 10 - 0.5
    assert after > 3 * chance, (after, chance)  # ~0.19 after 150 steps; chance 1/32


def _mqar(*args, cwd):
    import subprocess
    import sys

    return subprocess.run([sys.executable, "-m", "megatron_based.tasks.mqar", *args], cwd=cwd, capture_output=True,
                          text=True, timeout=300)


def _recall(stdout: str) -> float:
    return float(stdout.split("MQAR recall ")[1].split()[0])


def test_mqar_checkpoint_carries_its_model(tmp_path):
    """eval rebuilds the trained model from the checkpoint alone (swa_window 8, not the default 16, and seq_len 32),
    and a --config whose model section lacks a key the model needs is refused by name."""
    train = _mqar("train", "--pattern", "CLS", "--hidden-size", "32", "--swa-window", "8", "--seq-len", "32",
                  "--steps", "3", "--num-examples", "64", "--save", "ckpt.pt", cwd=tmp_path)
    assert train.returncode == 0, train.stderr
    saved = torch.load(tmp_path / "ckpt.pt", weights_only=True)
    assert saved["model"] == {"layer_pattern": "CLS", "hidden_size": 32, "num_attention_heads": 4, "feature_dim": 8,
                              "swa_window": 8, "vocab_size": 64, "seq_length": 32}
    ev = _mqar("eval", "--checkpoint", "ckpt.pt", "--num-examples", "64", cwd=tmp_path)
    assert ev.returncode == 0, ev.stderr
    assert _recall(ev.stdout) == _recall(train.stdout)  # same model, same test sequences
    assert "sequences of 32 tokens" in ev.stdout

    (tmp_path / "cfg.yaml").write_text("model:\n  layer_pattern: CLS\n  hidden_size: 32\n  num_attention_heads: 4\n"
                                       "  feature_dim: 8\n  vocab_size: 64\n  seq_length: 32\n")
    bad = _mqar("eval", "--config", "cfg.yaml", "--checkpoint", "ckpt.pt", cwd=tmp_path)
    assert bad.returncode == 2 and "lacks ['swa_window']" in bad.stderr, bad.stderr
    torch.save(saved["state_dict"], tmp_path / "bare.pt")
    bare = _mqar("eval", "--checkpoint", "bare.pt", cwd=tmp_path)
    assert bare.returncode == 2 and "carries no model configuration" in bare.stderr, bare.stderr
    (tmp_path / "cfg.yaml").write_text((tmp_path / "cfg.yaml").read_text() + "  swa_window: 8\n")
    legacy = _mqar("eval", "--config", "cfg.yaml", "--checkpoint", "bare.pt", "--num-examples", "64", cwd=tmp_path)
    assert legacy.returncode == 0, legacy.stderr
    assert _recall(legacy.stdout) == _recall(train.stdout)  # a bare state dict with a complete --config
