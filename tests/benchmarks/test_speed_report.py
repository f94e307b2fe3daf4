"""benchmarks/speed_report.py: the committed speed block of docs/benchmarks.md and its SVGs match the committed
JSONs, and the tables, ratios and goal verdicts it writes from small synthetic results."""
from __future__ import annotations

import json
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "benchmarks"))

import speed_report  # noqa: E402


def test_committed_docs_match_the_committed_results():
    out = subprocess.run([sys.executable, "benchmarks/speed_report.py", "--check"], cwd=ROOT, capture_output=True,
                         text=True, timeout=60)
    assert out.returncode == 0, out.stdout + out.stderr


def _train_row(model, graphs, tokens, mfu):
    return {"model": model, "seq": 8192, "cuda_graphs": graphs, "tp": 1, "cp": 1, "recompute": False,
            "tokens_per_step": 32768, "tokens_per_s_per_gpu": tokens, "tflops_per_gpu": 400.0, "mfu": mfu,
            "peak_mem_gib": 30.0, "loss_first": 6.0, "loss_last": 3.0, "loss_ok": True}


def _results(tmp_path: Path) -> Path:
    res = tmp_path / "results"
    res.mkdir()
    meta = {"gpu": "Test GPU", "torch": "9.9", "triton": "8.8", "date": "2030-01-02"}
    taylor = [{"dv": 64, "T": 4096, "B": 8, "kind": "fwdbwd", "ours": 1.0, "fla_parallel_based": 4.4,
               "fla_fused_chunk_based": None, "fa2_sdpa": 2.0},
              {"dv": 64, "T": 4096, "B": 8, "kind": "fwd", "ours": 0.3, "fla_parallel_based": 0.6,
               "fla_fused_chunk_based": 0.9, "fa2_sdpa": 0.45},
              {"dv": 64, "T": 2048, "B": 16, "kind": "fwdbwd", "ours": 1.0, "fla_parallel_based": 2.0,
               "fla_fused_chunk_based": 3.0, "fa2_sdpa": 1.2}]
    (res / "taylor_attention.json").write_text(json.dumps({**meta, "fla": "0.1", "shape": {"H": 16, "f": 16,
                                                                                          "tokens": 32768},
                                                           "rows": taylor}))
    swa = [{"B": 8, "T": 4096, "H": 16, "D": 64, "W": 128, "ours_fwd_ms": 0.1, "ours_fwdbwd_ms": 0.5,
            "flex_fwd_ms": 0.15, "flex_fwdbwd_ms": 1.0},
           {"B": 2, "T": 16384, "H": 16, "D": 64, "W": 128, "ours_fwd_ms": 0.2, "ours_fwdbwd_ms": 0.5,
            "flex_fwd_ms": 0.2, "flex_fwdbwd_ms": 0.85}]
    (res / "sliding_window.json").write_text(json.dumps({"meta": {**meta, "dtype": "bfloat16"}, "rows": swa}))
    train = [_train_row("based-360m", True, 210_000, 0.52), _train_row("gpt-360m", True, 100_000, 0.45),
             _train_row("based-360m", False, 170_000, 0.42), _train_row("gpt-360m", False, 100_000, 0.44)]
    (res / "train_throughput.json").write_text(json.dumps({"meta": {"device": "Test GPU", "date": "2030-01-02"},
                                                          "results": train}))
    return res


def test_tables_ratios_and_goal_verdicts(tmp_path):
    res = _results(tmp_path)
    doc = tmp_path / "docs" / "benchmarks.md"
    doc.parent.mkdir()
    doc.write_text("# Benchmarks\n\nIntro.\n\n## Older results\n\nkept as written\n")
    assert speed_report.main(["--results", str(res), "--doc", str(doc)]) == 0
    text = doc.read_text()
    assert text.startswith("# Benchmarks\n\nIntro.\n\n" + speed_report.BEGIN)
    assert text.endswith(speed_report.END + "\n\n## Older results\n\nkept as written\n")
    assert "Test GPU, torch 9.9, Triton 8.8, fla 0.1, 2030-01-02" in text
    # Taylor: fwd+bwd and fwd rows with each peer's ms and speedup; goals from those numbers
    assert "| 64 | 4,096 | 8 | fwd+bwd | 1.000 | 4.400 | 4.40x | - | - | 2.000 | 2.00x |" in text
    assert "| 64 | 4,096 | 8 | fwd | 0.300 | 0.600 | 2.00x | 0.900 | 3.00x | 0.450 | 1.50x |" in text
    assert "fwd+bwd B8 T4096 d_v 64 ≤ 1.1 ms: 1.000 ms, met" in text
    assert "there ≥ 4x fla parallel_based: 4.40x, met" in text
    assert "fwd ≤ 0.25 ms: 0.300 ms, **not met**" in text
    assert "fwd+bwd B16 T2048 ≥ 1.5x FA2: 1.20x, **not met**" in text
    assert "d_v 128 B8 T4096 fwd+bwd ≥ 3x FA2: not measured" in text
    # SWA: every shape at >= 1.6x fwd+bwd
    assert "| 2 | 16,384 | 16 | 64 | 128 | 0.200 | 0.200 | 1.00x | 0.500 | 0.850 | 1.70x |" in text
    assert "1.70x (the lowest, B2 T16384 H16 D64 W128; 2 of 2 shapes reach 1.6x), met" in text
    # training: plot_throughput's table, the ratio goals per graphs / eager, the best MFU
    assert "| based-360m +graphs | 8,192 | 32768 | no | 210,000 | 400.0 | 52.0% | 30.0 | 6.000->3.000 | **2.10x** |" \
        in text
    assert "≥ 2.0x GPT with graphs: 2.10x, met" in text and "≥ 1.8x eager: 1.70x, **not met**" in text
    assert "MFU ≥ 50%: 52.0% (graphs), met" in text
    # generation.json is missing: its subsection says so and how to produce it
    assert f"`{res.resolve() / 'generation.json'}` is missing: `{speed_report.SPEED_GPU}` writes it." in text
    svgs = sorted(p.name for p in doc.parent.glob("*.svg"))
    assert svgs == ["speed_swa.svg", "speed_taylor.svg", "speed_training.svg"]
    for name in svgs:
        assert ET.parse(doc.parent / name).getroot().tag.endswith("svg")
        assert f"]({name})" in text
    assert "4.4" in (doc.parent / "speed_taylor.svg").read_text()

    # in sync now; a changed SVG, a changed result or an edited block is reported by --check
    assert speed_report.main(["--results", str(res), "--doc", str(doc), "--check"]) == 0
    (doc.parent / "speed_swa.svg").write_text("<svg/>")
    assert speed_report.main(["--results", str(res), "--doc", str(doc), "--check"]) == 1
    assert speed_report.main(["--results", str(res), "--doc", str(doc)]) == 0
    assert doc.read_text() == text  # the block is replaced, not added again
    swa = json.loads((res / "sliding_window.json").read_text())
    swa["rows"][1]["flex_fwdbwd_ms"] = None  # a shape without a Flex time: the goal cannot be met
    (res / "sliding_window.json").write_text(json.dumps(swa))
    assert speed_report.main(["--results", str(res), "--doc", str(doc), "--check"]) == 1
    speed_report.main(["--results", str(res), "--doc", str(doc)])
    assert "2.00x (the lowest, B8 T4096 H16 D64 W128; 1 of 2 shapes reach 1.6x), **not met**" in doc.read_text()

    # decode: the table against the GPT's fastest decode, CUDA graphs per row, the 60k goal at batch 128
    gen = [{"model": "BASED", "cuda_graph": True, "batch": 128, "prompt_length": 128, "new_tokens": 1024,
            "prefill_s": 0.1, "decode_tokens_per_s": 65_000.0, "cache_bytes_per_sequence": 3 * 2**20,
            "peak_bytes_per_sequence": 5 * 2**20, "guard": {"passed": True}},
           {"model": "BASED", "cuda_graph": False, "error": "out of memory"},
           {"model": "GPT (SDPA, KV cache)", "cuda_graph": True, "batch": 64, "prompt_length": 128,
            "new_tokens": 1024, "prefill_s": 0.2, "decode_tokens_per_s": 13_000.0,
            "cache_bytes_per_sequence": 300 * 2**20, "peak_bytes_per_sequence": 310 * 2**20,
            "guard": {"passed": True}}]
    (res / "generation.json").write_text(json.dumps({"meta": {"device": "Test GPU", "date": "2030-01-02",
                                                              "config": "configs/based-1.3b.yaml",
                                                              "dtype": "torch.bfloat16"}, "results": gen}))
    speed_report.main(["--results", str(res), "--doc", str(doc)])
    text = doc.read_text()
    assert "| BASED | yes | 128 | 128 | 1024 | 100.0 | 65,000 | 5.00x | 3.0 | 5.0 | passed |" in text
    assert "| GPT (SDPA, KV cache) | yes | 64 | 128 | 1024 | 200.0 | 13,000 | 1.00x | 300.0 | 310.0 | passed |" in text
    assert "| BASED | no | | | | out of memory |" in text
    assert "decode ≥ 60k tokens/s at batch 128, prompt 128: 65,000 tokens/s (CUDA graphs), met" in text
    assert "is missing" not in text and (doc.parent / "speed_decode.svg").exists()


def test_swa_goal_on_device_time_when_every_row_has_it(tmp_path):
    """With the kernels' device times in every row (benchmarks/sliding_window.py records them), the SWA table shows
    them beside the eager medians and judges the goal on them: a host-bound eager time does not decide it."""
    res = _results(tmp_path)
    swa = json.loads((res / "sliding_window.json").read_text())
    for r, (ours, flex) in zip(swa["rows"], ((0.40, 0.80), (0.45, 0.81))):
        r.update(ours_fwdbwd_device_ms=ours, flex_fwdbwd_device_ms=flex)
    (res / "sliding_window.json").write_text(json.dumps(swa))
    doc = tmp_path / "benchmarks.md"
    doc.write_text("# Benchmarks\n")
    assert speed_report.main(["--results", str(res), "--doc", str(doc)]) == 0
    text = doc.read_text()
    assert "| 8 | 4,096 | 16 | 64 | 128 | 0.100 | 0.150 | 1.50x | 0.500 | 1.000 | 2.00x | 0.400 | 0.800 | 2.00x |" \
        in text
    assert ("at every shape (device time): 1.80x (the lowest, B2 T16384 H16 D64 W128; 2 of 2 shapes reach 1.6x), "
            "met") in text
    swa["rows"][1].pop("flex_fwdbwd_device_ms")  # one row without: the eager medians decide, as before
    (res / "sliding_window.json").write_text(json.dumps(swa))
    speed_report.main(["--results", str(res), "--doc", str(doc)])
    assert "at every shape: 1.70x (the lowest, B2 T16384" in doc.read_text()
