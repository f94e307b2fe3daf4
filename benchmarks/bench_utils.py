"""Helpers shared by the benchmarks: relative error, eager / device / CUDA-graph timings, table cells and a
grouped bar chart as SVG. torch and triton are imported inside the timing helpers, so the report scripts that only
format results (speed_report.py) load without them."""
from __future__ import annotations

import math
import statistics
import time
from xml.sax.saxutils import escape


def rel(a, b):
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm()).item()


GRAPH = {}  # name -> extra timings of the same call: device busy ms (profiler), CUDA-graph replay ms (--graph)
USE_GRAPH = False  # a failed capture poisons the CUDA context, so graph replay timing is opt-in (set by --graph)


def bench(fn, name=None):
    """Eager median ms (``do_bench``, L2 flushed between calls: host launch cost included when it exceeds the
    device time). With a name, also the device busy time (sum of kernel times, torch.profiler), the host time
    per call (``host_ms``) and, with --graph, the CUDA-graph replay median."""
    import triton.testing

    ms = triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median")
    if name is not None:
        GRAPH[f"{name}_device"] = kernel_breakdown(fn)[0]
        GRAPH[f"{name}_host"] = host_ms(fn)
        if USE_GRAPH:
            GRAPH[f"{name}_graph"] = triton.testing.do_bench_cudagraph(fn, rep=50, return_mode="median")
    return ms


def timing_kinds():
    """(row-key suffix, title) of each timing ``bench`` records with a name: the eager median, device and host time
    and, with --graph, the CUDA-graph replay median (the benchmarks print a table per kind)."""
    kinds = [("", "eager do_bench median"), ("_device", "device busy time (sum of kernels, torch.profiler)"),
             ("_host", "host time per call (Python + launches, no sync)")]
    return kinds + ([("_graph", "CUDA-graph replay median")] if USE_GRAPH else [])


def host_ms(fn, n=50):
    """Host (CPU) ms per call: median over n calls of the time until ``fn`` returns, each started on an idle GPU
    (synchronize before the call, not inside the timed span), so a full launch queue or the GPU's progress
    cannot block it. Eager time ~ max(device, host)."""
    import torch

    fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(n):
        torch.cuda.synchronize()
        t = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t) * 1e3)
    torch.cuda.synchronize()
    return round(statistics.median(times), 4)


def kernel_breakdown(fn, n=10, top=8):
    """(total, top kernels): device ms per call of the kernels that ``fn`` launches (torch.profiler)."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(n):
            fn()
        torch.cuda.synchronize()
    out = {}
    for e in prof.key_averages():
        t = getattr(e, "device_time_total", None) or getattr(e, "cuda_time_total", 0)
        if t:
            out[e.key[:60]] = round(t / n / 1000, 4)
    return round(sum(out.values()), 4), dict(sorted(out.items(), key=lambda kv: -kv[1])[:top])


def fwd_bwd(f, inputs, dy):
    import torch

    def run():
        # fresh leaves per call: autograd nodes are then made on the current stream (graph capture needs it)
        ins = [t.detach().requires_grad_() for t in inputs]
        torch.autograd.grad(f(*ins), ins, dy)
    return run


def fmt(x, p=3):
    """A table cell: ``x`` with ``p`` decimals, "-" when missing."""
    return "-" if x is None else f"{x:.{p}f}"


BAR_COLORS = ("#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b")


def svg_bars(title: str, ylabel: str, groups: list[str], series: list[str], values: list[list], unit: str = "") -> str:
    """A grouped bar chart as hand-written SVG text: one group per x label (a "\\n" starts a second line), one bar
    per series in each (``values[group][series]``, None leaves the slot empty), each bar's value above it, the
    legend under the title. ``unit`` follows each value label."""
    bw, L, R, T, B, H = 16, 72, 16, 64, 56, 440
    longest = max([len(line) for g in groups for line in g.split("\n")] or [1])
    pw = max(len(groups) * max(len(series) * bw + 18, 6.2 * longest + 10),  # each group as wide as its label
             7.6 * len(title) - L, 360)  # and the title fits
    gw, W = pw / max(len(groups), 1), L + pw + R
    vmax = max([v for row in values for v in row if v] or [1.0]) * 1.18  # room for the value labels
    mag = 10 ** math.floor(math.log10(vmax / 5))
    step = next(m * mag for m in (1, 2, 5, 10) if vmax / (m * mag) <= 6)
    top = step * math.ceil(vmax / step)
    py = lambda v: H - B - v / top * (H - T - B)  # noqa: E731
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{W:.0f}" height="{H}" font-family="sans-serif" '
           f'font-size="11"><rect width="{W:.0f}" height="{H}" fill="white"/>',
           f'<text x="{L}" y="20" font-size="14">{escape(title)}</text>']
    for i in range(round(top / step) + 1):
        y = py(i * step)
        out.append(f'<line x1="{L}" y1="{y:.1f}" x2="{W - R:.0f}" y2="{y:.1f}" stroke="#ddd"/>'
                   f'<text x="{L - 6}" y="{y + 4:.1f}" text-anchor="end">{i * step:g}</text>')
    out.append(f'<rect x="{L}" y="{T}" width="{W - L - R:.0f}" height="{H - T - B}" fill="none" stroke="black"/>')
    out.append(f'<text transform="translate(16 {(T + H - B) / 2:.0f}) rotate(-90)" text-anchor="middle">'
               f'{escape(ylabel)}</text>')
    x = L
    for k, name in enumerate(series):  # legend: one swatch and name per series, in a row
        out.append(f'<rect x="{x}" y="34" width="10" height="10" fill="{BAR_COLORS[k % len(BAR_COLORS)]}"/>'
                   f'<text x="{x + 14}" y="43">{escape(name)}</text>')
        x += 14 + 6.2 * len(name) + 18
    for g, (label, row) in enumerate(zip(groups, values)):
        x0 = L + g * gw + (gw - len(series) * bw) / 2
        for k, v in enumerate(row):
            if v is None:
                continue
            x, y = x0 + k * bw, py(v)
            out.append(f'<rect x="{x:.1f}" y="{y:.1f}" width="{bw - 2}" height="{H - B - y:.1f}" '
                       f'fill="{BAR_COLORS[k % len(BAR_COLORS)]}"/>'
                       f'<text transform="translate({x + bw / 2 + 3:.1f} {y - 4:.1f}) rotate(-90)" '
                       f'font-size="10">{v:.3g}{escape(unit)}</text>')
        cx = L + (g + 0.5) * gw
        for j, line in enumerate(label.split("\n")):
            out.append(f'<text x="{cx:.1f}" y="{H - B + 16 + 14 * j}" text-anchor="middle">{escape(line)}</text>')
    out.append("</svg>")
    return "\n".join(out) + "\n"


def with_block(text: str, block: str, begin: str, end: str, before_first_section: bool = False) -> str:
    """``text`` with the part from its ``begin`` marker to its ``end`` marker replaced by ``block`` (which carries
    both markers). Without the markers, ``block`` goes before the first ``## `` section when
    ``before_first_section`` (and there is one), else at the end."""
    if begin in text and end in text:
        head, rest = text.split(begin, 1)
        return head + block + rest.split(end, 1)[1]
    at = text.find("\n## ") if before_first_section else -1
    if at < 0:
        return text + ("\n" if text and not text.endswith("\n") else "") + block + "\n"
    return text[:at + 1] + block + "\n\n" + text[at + 1:]
