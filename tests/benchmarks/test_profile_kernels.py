"""benchmarks/profile_kernels.py (Nsight Compute counters, GPU only): its summaries of ncu's two CSV pages and of
its source page, on rows in the exact format ncu 2025.3 exported for the Taylor kernels on an H100 (trimmed to
what they read), and its command line without a GPU."""
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


# ncu's source page (``--page source --csv --print-source cuda,sass``) of the Taylor output pass on an H100: its
# layout (per file: path, function, header; a numbered row per source line, then its SASS rows), rows and columns
# trimmed to the ones the summary reads
SOURCE_PAGE = [
    ["File Path", "/opt/torch/.venv/lib/python3.12/site-packages/triton/language/standard.py"],
    ["Function Name", "taylor_chunk_output_kernel"],
    ["Line No", "Source", "Address", "Source", "Warp Stall Sampling (All Samples)",
     "Warp Stall Sampling (Not-issued Samples)", "# Samples", "Instructions Executed"],
    ["263", "return a + b", "-", "-", "4769", "3397", "4769", "6930432"],
    ["File Path", "/work/main/based_kernels/taylor_attention/chunk.py"],
    ["Function Name", "taylor_chunk_output_kernel"],
    ["Line No", "Source", "Address", "Source", "Warp Stall Sampling (All Samples)",
     "Warp Stall Sampling (Not-issued Samples)", "# Samples", "Instructions Executed"],
    ["50", "return tl.dot(b_a.to(tl.float32), b_b.to(tl.float32), input_precision=PREC)", "-", "-", "2371", "1764",
     "2371", "3850240"],
    ["", "", "0x7f2df97bc1e0", "      IMAD.U32 R8, R8, 0x10000, RZ", "2", "0", "2", "16384"],
    ["70", "i += (m >= r * (2 * F - r - 1) // 2).to(m.dtype)", "-", "-", "10541", "5494", "10541", "45957120"],
    ["", "", "0x7f2df97c3990", "      IMAD.MOV.U32 R18, RZ, RZ, 0x2", "1", "0", "1", "49152"],
    ["281", "b_A = tl.where(m_c, 1. + b_s + 0.5 * b_s * b_s, 0.)", "-", "-", "5445", "3608", "5445", "13647872"],
    ["", "", "0x7f2df97b9200", "      FFMA R65, R65, R10, 1", "1", "0", "1", "16384"],
]


def test_summary_of_the_source_page(tmp_path):
    import csv
    import gzip

    path = tmp_path / "source.csv.gz"
    with gzip.open(path, "wt", newline="") as f:
        csv.writer(f, quoting=csv.QUOTE_ALL).writerows(SOURCE_PAGE)
    top = profile_kernels.summarize_source(str(path), top=3)
    samples, insts = 4769 + 2371 + 10541 + 5445, 6930432 + 3850240 + 45957120 + 13647872  # the source lines only
    assert [t[0] for t in top] == ["chunk.py:70", "chunk.py:281", "standard.py:263"]
    assert abs(top[0][1] - 100 * 10541 / samples) < 1e-9 and abs(top[0][2] - 100 * 45957120 / insts) < 1e-9
    assert abs(top[2][2] - 100 * 6930432 / insts) < 1e-9
    assert top[1][3] == "b_A = tl.where(m_c, 1. + b_s + 0.5 * b_s * b_s, 0.)"


def test_command_line_without_a_gpu():
    run = subprocess.run([sys.executable, "benchmarks/profile_kernels.py", "--help"], cwd=ROOT, capture_output=True,
                         text=True, timeout=120)
    assert run.returncode == 0 and "--source" in run.stdout, run.stderr[-2000:]
    bad = subprocess.run([sys.executable, "benchmarks/profile_kernels.py", "--which", "mlp"], cwd=ROOT,
                         capture_output=True, text=True, timeout=120)
    assert bad.returncode != 0 and "--which: unknown ['mlp']" in bad.stderr
