"""Hardware counters of the Taylor and sliding-window kernels at the speed goals' shapes, by Nsight Compute: one
forward + backward of each, after warm-up (autotuning, compilation) outside the profiled range.

    python benchmarks/profile_kernels.py --ncu [--which taylor,swa] [--out DIR] [--kernels REGEX] [--source]

runs itself under ``ncu --profile-from-start off --clock-control none --set full`` (clocks left as they are),
writes ``DIR/kernels.ncu-rep``, ``DIR/kernels_details.csv`` and ``DIR/kernels_raw.csv`` (ncu's two pages) and
prints per kernel: duration, compute (SM) and memory throughput as % of peak, achieved / theoretical occupancy,
registers, the tensor pipe's share of active cycles and the top warp stall reasons; with ``--source`` also each
Triton kernel's source page (``DIR/source_<kernel>.csv.gz``) and its lines with the most executed instructions.
Without ``--ncu`` it is the profiled program itself (``ncu ... python benchmarks/profile_kernels.py`` also works).
Needs a CUDA GPU and ncu.
"""
from __future__ import annotations

import argparse
import csv
import glob
import gzip
import os
import shutil
import subprocess
import sys

SHAPES = {"taylor": "B 8, T 4096, H 16, f 16, d_v 64, bf16 (Taylor linear attention)",
          "swa": "B 8, T 4096, H 16, D 64, W 128, bf16 (sliding-window attention)"}
# metric name (ncu's details page) -> column label; a metric the ncu version does not report stays empty
COLUMNS = {
    "Duration": "us",
    "Compute (SM) Throughput": "SM %",
    "Memory Throughput": "mem %",
    "DRAM Throughput": "DRAM %",
    "Achieved Occupancy": "occ %",
    "Theoretical Occupancy": "theor. occ %",
    "Registers Per Thread": "regs",
    "Dynamic Shared Memory Per Block": "dyn smem",
    "Executed Ipc Active": "IPC",
}


def run_kernels(which: list[str]) -> None:
    import torch

    from based_kernels import sliding_window_attention
    from based_kernels.taylor_attention import taylor_linear_attention

    torch.manual_seed(0)
    dev, dt = "cuda", torch.bfloat16
    calls, leaves = [], []
    if "taylor" in which:
        q = (torch.randn(8, 4096, 16, 16, device=dev, dtype=dt) * 0.5).requires_grad_()
        k = (torch.randn(8, 4096, 16, 16, device=dev, dtype=dt) * 0.5).requires_grad_()
        v = torch.randn(8, 4096, 16, 64, device=dev, dtype=dt).requires_grad_()
        dy = torch.randn(8, 4096, 16, 64, device=dev, dtype=dt)
        calls.append(lambda: taylor_linear_attention(q, k, v)[0].backward(dy))
        leaves += [q, k, v]
    if "swa" in which:
        qs, ks, vs = (torch.randn(8, 4096, 16, 64, device=dev, dtype=dt).requires_grad_() for _ in range(3))
        do = torch.randn(8, 4096, 16, 64, device=dev, dtype=dt)
        calls.append(lambda: sliding_window_attention(qs, ks, vs, window=128).backward(do))
        leaves += [qs, ks, vs]
    for fn in calls:  # warm-up: autotuning and compilation happen here, outside the profiled range
        for _ in range(3):
            fn()
    for t in leaves:
        t.grad = None  # the profiled backward assigns the leaves' gradients (no accumulation kernels)
    torch.cuda.synchronize()
    torch.cuda.profiler.start()
    for fn in calls:
        fn()
    torch.cuda.synchronize()
    torch.cuda.profiler.stop()


def find_ncu() -> str:
    found = shutil.which("ncu") or next(iter(sorted(glob.glob("/opt/nvidia/nsight-compute/*/ncu"))), None)
    if not found:
        sys.exit("ncu (Nsight Compute) not found on PATH or under /opt/nvidia/nsight-compute")
    return found


def summarize(details_csv: str, raw_csv: str) -> list[dict]:
    """One row per profiled kernel launch: the COLUMNS metrics from ncu's details page; from its raw page the
    tensor pipe's share of active cycles (``sm__pipe_tensor_cycles_active``, SM average) and the three largest warp
    stall reasons (``smsp__average_warps_issue_stalled_<reason>_per_issue_active``: warps stalled for that reason
    per issued instruction)."""
    rows: dict[str, dict] = {}
    with open(details_csv, newline="") as f:
        for r in csv.DictReader(f):
            kid = r.get("ID")
            if kid is None or "Metric Name" not in r:
                continue
            row = rows.setdefault(kid, {"id": int(kid), "name": r["Kernel Name"], "kernel": r["Kernel Name"][:48],
                                        "grid": r.get("Grid Size"), "block": r.get("Block Size")})
            name, value, unit = r["Metric Name"], r["Metric Value"], r.get("Metric Unit", "")
            if name == "Duration":  # ncu scales the unit per value
                scale = {"ns": 1e-3, "nsecond": 1e-3, "us": 1., "usecond": 1., "ms": 1e3, "msecond": 1e3}
                value = f"{float(value.replace(',', '')) * scale.get(unit, float('nan')):.1f}"
            if name in COLUMNS and not (COLUMNS[name].endswith("%") and unit != "%"):  # e.g. Memory Throughput
                row[COLUMNS[name]] = value  # is also a GB/s row of the memory section
    with open(raw_csv, newline="") as f:
        table = list(csv.reader(f))
    head = table[0]
    for r in table[2:]:  # the second row holds the units
        d = dict(zip(head, r))
        row = rows.get(d.get("ID"))
        if row is None:
            continue
        num = {}
        for name, value in d.items():
            try:
                num[name] = float(value.replace(",", ""))
            except ValueError:
                pass
        tensor = num.get("sm__pipe_tensor_cycles_active.avg.pct_of_peak_sustained_active")
        if tensor is not None:
            row["tensor %"] = f"{tensor:.1f}"
        pre, suf = "smsp__average_warps_issue_stalled_", "_per_issue_active.ratio"
        stalls = {n[len(pre):-len(suf)]: v for n, v in num.items() if n.startswith(pre) and n.endswith(suf)}
        row["stalls"] = ", ".join(f"{n} {v:.2f}" for n, v in sorted(stalls.items(), key=lambda kv: -kv[1])[:3])
    return sorted(rows.values(), key=lambda r: r["id"])


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--which", default="taylor,swa", help="comma-separated among taylor, swa")
    ap.add_argument("--ncu", action="store_true", help="run this script under ncu and print the per-kernel summary")
    ap.add_argument("--out", default=".", help="folder for kernels.ncu-rep and the CSVs (with --ncu)")
    ap.add_argument("--kernels", default=None, help="profile only kernels whose name matches this regex")
    ap.add_argument("--source", action="store_true",
                    help="also write ncu's source page per kernel (SASS with per-instruction counters, with the "
                         "Python source lines where ncu resolves them) to DIR/source_<kernel>.csv.gz and print "
                         "each kernel's lines with the most executed instructions")
    a = ap.parse_args()
    which = [w for w in a.which.split(",") if w]
    bad = [w for w in which if w not in SHAPES]
    if bad:
        sys.exit(f"--which: unknown {bad}; choose among {sorted(SHAPES)}")
    if not a.ncu:
        run_kernels(which)
        return 0
    ncu = find_ncu()
    os.makedirs(a.out, exist_ok=True)
    rep = os.path.join(a.out, "kernels")
    for w in which:
        print(f"profiling {SHAPES[w]}: one forward + backward", flush=True)
    cmd = [ncu, "--profile-from-start", "off", "--clock-control", "none", "--set", "full",
           "--import-source", "yes" if a.source else "no", "-f", "-o", rep]
    if a.kernels:
        cmd += ["--kernel-name", f"regex:{a.kernels}"]
    subprocess.run(cmd + [sys.executable, os.path.abspath(__file__), "--which", a.which], check=True)
    for page in ("details", "raw"):
        with open(f"{rep}_{page}.csv", "w") as f:
            subprocess.run([ncu, "--import", rep + ".ncu-rep", "--csv", "--page", page], check=True, stdout=f)
    rows = summarize(f"{rep}_details.csv", f"{rep}_raw.csv")
    cols = ["id", "kernel", "grid", "block", *COLUMNS.values(), "tensor %", "stalls"]
    print(" | ".join(cols))
    for r in rows:
        print(" | ".join(str(r.get(c, "")) for c in cols), flush=True)
    if a.source:
        for name in sorted({r["name"] for r in rows if r["name"].isidentifier()}):  # Triton's kernels
            export_source(ncu, rep + ".ncu-rep", name, os.path.join(a.out, f"source_{name}.csv.gz"))
    return 0


def summarize_source(path: str, top: int = 8) -> list[tuple[str, float, float, str]]:
    """The ``top`` source lines of a kernel by executed instructions in ncu's source page (``export_source``):
    ``(file:line, % of the kernel's warp-stall samples, % of its executed instructions, source text)``. The page
    holds, per source file, a "File Path" row, a "Function Name" row, a header, then one row per source line (its
    number first) followed by that line's SASS rows (no number)."""
    with gzip.open(path, "rt", newline="") as f:
        table = list(csv.reader(f))
    lines, file, head = [], None, None
    for r in table:
        if not r:
            continue
        if r[0] == "File Path":
            file = os.path.basename(r[1])
        elif r[0] == "Line No":
            head = ["Line No", "Source", "Address", "SASS", *r[4:]]  # "Source" twice: the line's, then the SASS
        elif head and r[0] != "Function Name" and r[0]:
            lines.append((file, dict(zip(head, r))))

    def num(d, key):
        try:
            return float(d.get(key, "").replace(",", ""))
        except ValueError:
            return 0.

    samples = sum(num(d, "Warp Stall Sampling (All Samples)") for _, d in lines) or 1.
    insts = sum(num(d, "Instructions Executed") for _, d in lines) or 1.
    ranked = sorted(lines, key=lambda fd: -num(fd[1], "Instructions Executed"))[:top]
    return [(f"{file}:{d['Line No']}", 100 * num(d, "Warp Stall Sampling (All Samples)") / samples,
             100 * num(d, "Instructions Executed") / insts, d["Source"].strip()) for file, d in ranked]


def export_source(ncu: str, report: str, kernel: str, path: str) -> None:
    """ncu's source page of the first launch of ``kernel`` in ``report``, gzipped: Python lines and SASS if ncu
    can print both, else SASS alone."""
    base = [ncu, "--import", report, "--page", "source", "--csv", "--kernel-name", kernel, "--launch-count", "1"]
    for view in ("cuda,sass", "sass"):
        done = subprocess.run(base + ["--print-source", view], capture_output=True)
        if done.returncode == 0 and done.stdout:
            with gzip.open(path, "wb") as f:
                f.write(done.stdout)
            print(f"source page ({view}) of {kernel}: {path}; the lines with the most executed instructions "
                  "(% of the kernel's stall samples, % of its instructions):", flush=True)
            for where, samp, inst, text in summarize_source(path):
                print(f"  {where:24s} {samp:5.1f}% {inst:5.1f}%  {text[:80]}", flush=True)
            return
    print(f"no source page for {kernel}: {done.stderr.decode()[-300:]}", flush=True)


if __name__ == "__main__":
    sys.exit(main())
