"""benchmarks/profile_kernels.py (Nsight Compute counters, GPU only): its summary of ncu's two CSV pages, on rows in
the exact format ncu 2025.3 exported for the Taylor gradient kernel on an H100 (trimmed to the metrics it reads),
and its command line without a GPU."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "benchmarks"))

import profile_kernels  # noqa: E402

HEAD = ('"ID","Process ID","Process Name","Host Name","Kernel Name","Context","Stream","Block Size","Grid Size",'
        '"Device","CC","Section Name","Metric Name","Metric Unit","Metric Value","Rule Name","Rule Type",'
        '"Rule Description","Estimated Speedup Type","Estimated Speedup"')
ROW = '"6","705","python3.12","127.0.0.1","taylor_chunk_grad_kernel","1","7","(128, 1, 1)","(1, 256, 16)","0","9.0",'
DETAILS = "\n".join([HEAD] + [ROW + r for r in (
    '"GPU Speed Of Light Throughput","Memory Throughput","%","32.42",',
    '"GPU Speed Of Light Throughput","Duration","us","864.13",',
    '"GPU Speed Of Light Throughput","Compute (SM) Throughput","%","31.87",',
    '"SpeedOfLight","","","","SOLBottleneck","OPT","This workload exhibits low compute throughput.","",""',
    '"Memory Workload Analysis","Memory Throughput","Tbyte/s","1.05",',
    '"Launch Statistics","Registers Per Thread","register/thread","255",',
    '"Occupancy","Achieved Occupancy","%","12.30",',
    '"Occupancy","Theoretical Occupancy","%","12.50",')]) + "\n"
RAW_NAMES = ["ID", "Kernel Name", "sm__pipe_tensor_cycles_active.avg.pct_of_peak_sustained_active",
             "sm__pipe_tensor_cycles_active.max.pct_of_peak_sustained_active"] + [
    f"smsp__average_warps_issue_stalled_{r}_per_issue_active.ratio"
    for r in ("barrier", "long_scoreboard", "not_selected", "selected", "wait")]
RAW = "\n".join(",".join(f'"{x}"' for x in row) for row in (
    RAW_NAMES, ["", "", "%", "%", "inst", "inst", "inst", "inst", "inst"],
    ["6", "taylor_chunk_grad_kernel", "10.660714", "10.993862", "0.848038", "1.847901", "0.209152", "1.000000",
     "1.133424"])) + "\n"


def test_summary_of_ncu_pages(tmp_path):
    (tmp_path / "d.csv").write_text(DETAILS)
    (tmp_path / "r.csv").write_text(RAW)
    [row] = profile_kernels.summarize(str(tmp_path / "d.csv"), str(tmp_path / "r.csv"))
    assert row["kernel"] == "taylor_chunk_grad_kernel" and row["grid"] == "(1, 256, 16)"
    assert row["us"] == "864.1" and row["regs"] == "255"
    assert row["mem %"] == "32.42"  # the % row, not the memory section's Tbyte/s row of the same name
    assert row["SM %"] == "31.87" and row["occ %"] == "12.30" and row["theor. occ %"] == "12.50"
    assert row["tensor %"] == "10.7"  # the SM average, not the max
    assert row["stalls"] == "long_scoreboard 1.85, wait 1.13, selected 1.00"


def test_duration_in_other_units(tmp_path):
    (tmp_path / "d.csv").write_text(DETAILS.replace('"Duration","us","864.13"', '"Duration","ms","1.50"'))
    (tmp_path / "r.csv").write_text(RAW)
    assert profile_kernels.summarize(str(tmp_path / "d.csv"), str(tmp_path / "r.csv"))[0]["us"] == "1500.0"


def test_command_line_without_a_gpu():
    run = subprocess.run([sys.executable, "benchmarks/profile_kernels.py", "--help"], cwd=ROOT, capture_output=True,
                         text=True, timeout=120)
    assert run.returncode == 0 and "--source" in run.stdout, run.stderr[-2000:]
    bad = subprocess.run([sys.executable, "benchmarks/profile_kernels.py", "--which", "mlp"], cwd=ROOT,
                         capture_output=True, text=True, timeout=120)
    assert bad.returncode != 0 and "--which: unknown ['mlp']" in bad.stderr
