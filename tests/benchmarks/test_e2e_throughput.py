"""benchmarks/train_throughput.py (per-layer-type profile), plot_throughput.py, and the two GPU scripts' CPU
smoke modes (run_e2e_gpu.sh, run_e2e_2gpu.sh with 2 gloo processes)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch.autograd.profiler import record_function
from torch.profiler import ProfilerActivity, profile

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "benchmarks"))

import plot_throughput  # noqa: E402
import train_throughput  # noqa: E402

LAYER_TYPES = ("L", "S", "C", "MLP", "norm", "head+loss", "embedding")


def _event(name, start, end, parent=None, device=False):
    from types import SimpleNamespace

    tr = SimpleNamespace(start=start, end=end, elapsed_us=lambda: end - start)
    return SimpleNamespace(name=name, time_range=tr, cpu_parent=parent, sequence_nr=-1, thread=1, fwd_thread=1,
                           is_user_annotation=False, device_type=torch.autograd.DeviceType.CUDA if device
                           else torch.autograd.DeviceType.CPU)


def test_idle_gaps_go_to_the_launch_the_gpu_waited_for():
    conv = _event("e2e::C", 0, 100)
    mul = _event("aten::mul", 10, 20, conv)
    opt = _event("e2e::optimizer", 100, 300)
    copy = _event("aten::copy_", 140, 160, opt)
    events = [conv, mul, _event("cudaLaunchKernel", 12, 15, mul), opt, copy,
              _event("cudaLaunchKernel", 150, 155, copy), _event("cuLaunchKernelEx", 200, 204, opt),
              _event("k1", 20, 50, device=True), _event("k2", 30, 60, device=True),  # overlapping: one busy span
              _event("k3", 160, 170, device=True), _event("k4", 170, 180, device=True),  # back to back: no gap
              _event("k5", 210, 230, device=True)]
    got = train_throughput.idle_gaps(events, list(train_throughput.labelled(events)), steps=2)
    # gaps: 60 -> 160 (waiting for aten::copy_'s launch), 180 -> 210 (the optimizer's own launch); per step, ms
    assert got["idle_ms"] == round(130 / 2 / 1e3, 4) and got["kernels_per_step"] == 2.5
    assert got["idle_by_type"] == {"optimizer": round(130 / 2 / 1e3, 4)}
    assert got["idle_top_ops"] == [["optimizer: aten::copy_", 0.05], ["optimizer: e2e::optimizer", 0.015]]


def test_backward_ops_get_the_label_of_the_forward_range_that_made_their_node():
    x = torch.randn(4, 8)
    w1, w2 = torch.randn(8, 8, requires_grad=True), torch.randn(8, 8, requires_grad=True)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        with record_function("e2e::A"):
            h = (x @ w1).relu()
            h.view(-1)  # makes no autograd node but records the next sequence number, which B's matmul then takes
        with record_function("e2e::B"):
            y = (h @ w2).sin()
        y.sum().backward()
    got = {}
    for e, label, phase in train_throughput.labelled(prof.events()):
        if e.name.startswith(train_throughput.BACKWARD):
            got.setdefault(e.name[len(train_throughput.BACKWARD):], []).append((label, phase))
    assert got["SinBackward0"] == [("B", "bwd")]
    assert got["ReluBackward0"] == [("A", "bwd")]
    assert got["MmBackward0"] == [("B", "bwd"), ("A", "bwd")]  # w2's product is differentiated first
    assert got["SumBackward0"] == [("other", "bwd")]  # made outside every range
    assert {lab for _, lab, ph in train_throughput.labelled(prof.events()) if ph == "fwd"} == {"A", "B"}


def _run(script, tmp_path, *args):
    env = dict(os.environ, PYTHON=sys.executable, OUT=str(tmp_path), TRITON_INTERPRET="1", OMP_NUM_THREADS="1")
    proc = subprocess.run(["bash", f"benchmarks/{script}", "--smoke", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)
    assert "FAILED" not in proc.stdout, proc.stdout[-4000:] + proc.stderr[-4000:]
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    return proc.stdout


def _check_rows(rows):
    for r in rows:
        assert not r.get("error") and not r.get("oom") and "profile_error" not in r, r
        assert r["loss_ok"] and r["tokens_per_s_per_gpu"] > 0, r
        by = r["profile"]["by_type"]
        # the profile accounts for the step: next to no time outside a labelled range or backward node (on CPU the
        # unlabelled host ops, copies and selects of a few ms, grow with the machine's load: 5.1% once in a full
        # two-worker suite run, under 5% alone)
        assert by.get("other", {}).get("total", 0) < 0.08 * r["profile"]["attributed_ms"] or r["recompute"], by
        types = LAYER_TYPES if r["model"] == "tiny" else ("A", "MLP", "norm", "head+loss", "embedding")
        for t in types:
            assert by[t]["fwd"] > 0 and by[t].get("bwd", 0) > 0, (t, by[t])
        assert by["optimizer"]["step"] > 0


def test_run_e2e_gpu_smoke(tmp_path):
    out = _run("run_e2e_gpu.sh", tmp_path)
    doc = json.loads((tmp_path / "train_throughput.json").read_text())
    rows = doc["results"]
    # parts: the pairs; "64k" (here 128, smoke forces recompute); "based-1.3b" (here tiny, tokens/step 64)
    assert [(r["model"], r["seq"], r["recompute"], r["tokens_per_step"]) for r in rows] == [
        ("tiny", 64, False, 128), ("gpt-tiny", 64, False, 128), ("tiny", 128, True, 128),
        ("gpt-tiny", 128, True, 128), ("tiny", 64, True, 64)]
    _check_rows(rows)
    assert len(doc["meta"]["runs"]) == 3  # the three parts appended to one file
    from PIL import Image

    with Image.open(tmp_path / "train_throughput.png") as img:
        assert img.size == (940, 560)
    assert "| tiny | 64 |" in (tmp_path / "train_throughput.md").read_text() and "BASED / GPT" in out


def test_run_e2e_2gpu_smoke(tmp_path):
    _run("run_e2e_2gpu.sh", tmp_path)
    rows = json.loads((tmp_path / "e2e_2gpu.json").read_text())["results"]
    assert {(r["seq"], r["local_seq"], r["tp"], r["cp"]) for r in rows} == {(64, 64, 1, 1), (128, 64, 1, 2),
                                                                           (64, 64, 2, 1)}
    _check_rows(rows)
    cp2 = next(r for r in rows if r["cp"] == 2)["profile"]["by_type"]
    assert any(lab.startswith("comm/") and lab != "comm/grad-sync" for lab in cp2)  # the mixers' CP exchanges
    assert len(json.loads((tmp_path / "cp_comm.json").read_text())["rows"]) == 4
    md = (tmp_path / "e2e_2gpu.md").read_text()
    assert md.count("| tiny | 128 | 1 | 2 |") == 1 and "efficiency" in md


def test_plot_and_tables_from_the_committed_results(tmp_path, capsys):
    src = ROOT / "benchmarks" / "results" / "train_throughput.json"
    key = lambda r: (r["seq"], r.get("cuda_graphs"), r.get("recompute"))  # noqa: E731
    rows = {(r["model"], *key(r)): r for r in json.loads(src.read_text())["results"] if "error" not in r}
    pairs = [(r, rows["gpt-360m", *k]) for (m, *k), r in rows.items()
             if m == "based-360m" and ("gpt-360m", *k) in rows]
    assert pairs, "the committed results need a based-360m row with its same-setting gpt-360m row"
    assert plot_throughput.main([str(src), "--png", str(tmp_path / "t.png")]) == 0
    md = capsys.readouterr().out
    for based, gpt in pairs:
        assert f"**{based['tokens_per_s_per_gpu'] / gpt['tokens_per_s_per_gpu']:.2f}x**" in md
    from PIL import Image

    with Image.open(tmp_path / "t.png") as img:
        img.load()
        assert img.getpixel((0, 0)) == (255, 255, 255) and len(img.getcolors(1 << 16)) > 3


def test_scaling_efficiency_oom_and_errors(tmp_path, capsys):
    base = dict(model="based-360m", seq=8192, local_seq=8192, tp=1, cp=1, tokens_per_step=8192, micro_batch=1,
                recompute=False, step_ms=100.0, tokens_per_s_per_gpu=80000.0, tflops_per_gpu=100.0, mfu=0.1,
                peak_mem_gib=10.0, loss_first=9.0, loss_last=8.0, loss_ok=True)
    row = lambda **kw: dict(base, **kw)  # noqa: E731
    results = [row(), row(seq=16384, cp=2, tokens_per_s_per_gpu=72000.0), row(tp=2, tokens_per_s_per_gpu=60000.0),
               row(model="gpt-360m", tokens_per_s_per_gpu=64000.0),
               dict(model="gpt-360m", seq=65536, tp=1, cp=1, recompute=False, oom=True),
               dict(model="based-360m", seq=65536, tp=1, cp=1, recompute=False, error="RuntimeError: boom")]
    path = tmp_path / "r.json"
    path.write_text(json.dumps(dict(meta=dict(device="NVIDIA H200", date="2026-11-23"), results=results)))
    plot_throughput.main([str(path), "--png", str(tmp_path / "r.png")])
    md = capsys.readouterr().out
    assert "| based-360m | 16,384 | 1 | 2 | 72,000 | 80,000 (T=8,192) | **90.0%** |" in md
    assert "| based-360m | 8,192 | 2 | 1 | 60,000 | 80,000 (T=8,192) | **75.0%** |" in md
    assert "**1.25x**" in md and "| gpt-360m | 65,536 | | no | OOM |" in md and "error: RuntimeError: boom" in md


def test_bad_input_is_refused(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"rows": []}))
    with pytest.raises(SystemExit, match="no 'results' list"):
        plot_throughput.main([str(bad)])
    with pytest.raises(SystemExit, match="unknown model"):
        train_throughput.model_section("based-7b")
