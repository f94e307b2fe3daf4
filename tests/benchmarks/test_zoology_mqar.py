"""benchmarks/zoology_mqar.py: Zoology's own code (from a git clone at fixed commits) trains a tiny MQAR setting on
CPU, the run continues from its state.pt, a state of other settings is refused, and a wrong clone path is one line.

Needs a Zoology git clone or mirror: $ZOOLOGY_REPO, else the first of DEFAULT_REPOS that exists (docs/mqar.md's
clone beside this checkout, then a bare mirror); skipped without one."""
from __future__ import annotations

import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "benchmarks" / "zoology_mqar.py"
DEFAULT_REPOS = [ROOT.parent / "zoology", Path("/work/.mirror/HazyResearch+zoology/repo")]
REPO = (Path(os.environ["ZOOLOGY_REPO"]) if os.environ.get("ZOOLOGY_REPO")
        else next((p for p in DEFAULT_REPOS if p.is_dir()), DEFAULT_REPOS[0]))
# Zoology's own imports beyond ours; here they come with the deepspeed extra (`make test` installs it)
ZOOLOGY_DEPS = [name for name in ("pydantic", "einops", "tqdm") if importlib.util.find_spec(name) is None]
# a few seconds per run on one CPU thread
TINY = ["--n-train", "256", "--n-test", "64", "--seq-len", "32", "--num-kv-pairs", "2", "--d-model", "16",
        "--epochs", "2", "--batch-size", "64", "--device", "cpu", "--threads", "1"]


needs_zoology = pytest.mark.skipif(
    not REPO.is_dir() or bool(ZOOLOGY_DEPS),
    reason=f"no Zoology clone at {REPO}: git clone https://github.com/HazyResearch/zoology {REPO}, or set ZOOLOGY_REPO"
    if not REPO.is_dir() else f"Zoology's code needs {ZOOLOGY_DEPS} (pip install them)")


def zoology(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), *args], cwd=cwd, capture_output=True, text=True,
                          timeout=300, env={**os.environ, "PYTHONWARNINGS": "ignore"})


@needs_zoology
def test_trains_continues_and_refuses_other_settings(tmp_path):
    out = tmp_path / "run"
    first = zoology("--zoology-repo", str(REPO), "--out-dir", str(out), *TINY, cwd=tmp_path)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    history = json.loads((out / "history.json").read_text())
    assert [r["epoch"] for r in history] == [1, 2], history
    for r in history:
        assert math.isfinite(r["train_loss"]) and math.isfinite(r["test_loss"]), r
        assert 0 <= r["test_acc_zoology"] <= 1 and 0 <= r["test_acc_per_seq"] <= 1, r
        assert r["n_labelled"] == 64 * 2 and r["labels_per_seq_min_max"] == [2, 2], r  # 2 queries per sequence
    # the per-epoch JSON lines are the history's records
    printed = [json.loads(line) for line in first.stdout.splitlines() if line.startswith('{"epoch"')]
    assert printed == history
    # the code it ran is the clone's, at the pinned commits, written into the run's folder
    sources = (out / "zoology_src" / "SOURCES.txt").read_text()
    assert "d88d6f5474f36998d82d5c3bd58a190248d0a669 zoology/model.py" in sources
    assert "8486daf5b71f1f890bc31492197e88e3a094e843 zoology/train.py" in sources
    assert "FastTrainer" in first.stdout

    # the same command again: resumes after the last epoch, trains nothing more
    again = zoology("--zoology-repo", str(REPO), "--out-dir", str(out), *TINY, cwd=tmp_path)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    assert "resumed from" in again.stdout and "done" in again.stdout
    assert '{"epoch"' not in again.stdout
    assert json.loads((out / "history.json").read_text()) == history

    # another learning rate on the same state: refused, one line naming state.pt and the setting
    other = zoology("--zoology-repo", str(REPO), "--out-dir", str(out), *TINY, "--lr", "0.02", cwd=tmp_path)
    assert other.returncode != 0
    lines = other.stderr.strip().splitlines()
    assert len(lines) == 1 and "state.pt" in lines[0] and "--lr" in lines[0], other.stderr
    assert json.loads((out / "history.json").read_text()) == history


def test_wrong_zoology_repo_is_one_line(tmp_path):
    missing = tmp_path / "no-zoology-here"
    run = zoology("--zoology-repo", str(missing), "--out-dir", str(tmp_path / "run"), *TINY, cwd=tmp_path)
    assert run.returncode != 0
    lines = run.stderr.strip().splitlines()
    assert len(lines) == 1 and str(missing) in lines[0] and "git clone" in lines[0], run.stderr
    assert "Traceback" not in run.stderr
    assert not (tmp_path / "run").exists()  # nothing written before the clone is checked


NUMBERS = ("train_loss", "test_loss", "test_acc_zoology", "test_acc_per_seq")


@needs_zoology
def test_fast_loop_equals_zoology_loop_and_a_continued_run_the_straight_one(tmp_path):
    """The reference is Zoology's own Trainer loop (``--exact-zoology-loop``: full-vocabulary logits at every
    position): the default loop, which applies the tied head only at labelled positions, gives its training and
    test losses up to summation order, the second epoch's after one epoch of updates from each loop's gradients
    (at this size both accuracies are still 0, so they are not compared). A run stopped after one epoch and
    continued gives the straight run's numbers bitwise (weights, optimizer, schedule and RNG streams restored from
    state.pt)."""
    def history(name, *extra):
        run = zoology("--zoology-repo", str(REPO), "--out-dir", str(tmp_path / name), *TINY, *extra, cwd=tmp_path)
        assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
        return [{k: r[k] for k in NUMBERS} for r in json.loads((tmp_path / name / "history.json").read_text())]

    fast, exact = history("fast"), history("exact", "--exact-zoology-loop")
    assert len(fast) == len(exact) == 2
    for f, e in zip(fast, exact):
        for k in ("train_loss", "test_loss"):
            assert f[k] == pytest.approx(e[k], rel=1e-5), (k, f, e)
    zoology("--zoology-repo", str(REPO), "--out-dir", str(tmp_path / "cont"), *TINY, "--stop-after", "1",
            cwd=tmp_path)
    assert history("cont") == fast
