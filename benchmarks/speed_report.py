"""The latest speed results per area (Taylor linear attention, sliding-window attention, end-to-end training,
decode) as one generated block near the top of docs/benchmarks.md, with one SVG bar chart per area in docs/.

    python benchmarks/speed_report.py [--results benchmarks/results] [--doc docs/benchmarks.md] [--check]

Reads taylor_attention.json, sliding_window.json, train_throughput.json and generation.json from --results and
rewrites the block between the ``<!-- speed-report:begin -->`` / ``<!-- speed-report:end -->`` lines of --doc
(placed before its first ``## `` section when there is none yet) and the SVGs in the doc's folder. Each area's goals
(issue 21) are checked against the numbers in the JSON. A missing JSON leaves one line naming the command that
writes it. --check writes nothing and exits 1 when the block or an SVG differs from what the JSONs give
(tests/benchmarks/test_speed_report.py runs it on the committed files).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_utils import fmt, svg_bars, with_block  # noqa: E402
from plot_throughput import load, ok, single_gpu, throughput_table  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
BEGIN, END = "<!-- speed-report:begin -->", "<!-- speed-report:end -->"
SPEED_GPU = "OUT=benchmarks/results bash benchmarks/run_speed_gpu.sh"
TAYLOR_PEERS = {"fla_parallel_based": "fla parallel_based", "fla_fused_chunk_based": "fla fused_chunk_based",
                "fa2_sdpa": "FA2 (SDPA)"}


def goal(label: str, value, target: float, unit: str, at_most: bool = False, note: str = "",
         complete: bool = True) -> str:
    """``label: measured, met / not met``; ``unit`` picks the format: ms, x (a speedup), % (a fraction), tok/s.
    ``complete`` False: a case the goal covers was not measured, so it cannot be met."""
    if value is None:
        return f"{label}: not measured"
    text = {"ms": f"{value:.3f} ms", "x": f"{value:.2f}x", "%": f"{value:.1%}", "tok/s": f"{value:,.0f} tokens/s"}
    met = complete and (value <= target if at_most else value >= target)
    return f"{label}: {text[unit]}{note}, {'met' if met else '**not met**'}"


def goals(items: list[str]) -> str:
    return "Goals (issue 21): " + "; ".join(items) + "."


def env(meta: dict, json_path: str, what: str) -> str:
    """The line that says where and with what the numbers were measured."""
    libs = [f"{lib} {meta[key]}" for lib, key in (("torch", "torch"), ("Triton", "triton"), ("fla", "fla"))
            if meta.get(key)]
    return ", ".join([meta.get("gpu") or meta.get("device", "unknown device"), *libs, meta.get("date", "undated")]) \
        + f"; {what}; JSON `{json_path}`."


def speedup(peer, ours) -> str:
    return f"{peer / ours:.2f}x" if peer and ours else "-"


def taylor(path: Path) -> tuple[list[str], str]:
    doc = json.loads(path.read_text())
    rows = {(r["dv"], r["T"], r["B"], r["kind"]): r for r in doc.get("rows", [])}
    order = sorted(rows, key=lambda k: (k[0], k[1], k[3] != "fwdbwd"))  # fwd+bwd, then fwd, at each (d_v, T)
    s = doc.get("shape", {})
    lines = [env(doc, shown(path), f"H {s.get('H')}, f {s.get('f')}, B*T = {s.get('tokens', 0):,} tokens, median "
                                   "ms; ours, fla and FA2 timed in one process (`benchmarks/taylor_attention.py`)"), "",
             "| d_v | T | B | pass | ours ms | " + " | ".join(f"{n} ms | speedup" for n in TAYLOR_PEERS.values())
             + " |", "|---|---|---|---|---|" + "---|---|" * len(TAYLOR_PEERS)]
    for k in order:
        r = rows[k]
        lines.append(f"| {k[0]} | {k[1]:,} | {k[2]} | {'fwd+bwd' if k[3] == 'fwdbwd' else 'fwd'} | "
                     f"{fmt(r.get('ours'))} | "
                     + " | ".join(f"{fmt(r.get(p))} | {speedup(r.get(p), r.get('ours'))}" for p in TAYLOR_PEERS) + " |")
    get = lambda dv, T, B, kind, key="ours": (rows.get((dv, T, B, kind)) or {}).get(key)  # noqa: E731
    ratio = lambda dv, T, B, peer: get(dv, T, B, "fwdbwd", peer) / get(dv, T, B, "fwdbwd") \
        if get(dv, T, B, "fwdbwd", peer) and get(dv, T, B, "fwdbwd") else None  # noqa: E731
    lines += ["", goals([goal("fwd+bwd B8 T4096 d_v 64 ≤ 1.1 ms", get(64, 4096, 8, "fwdbwd"), 1.1, "ms", True),
                         goal("there ≥ 4x fla parallel_based", ratio(64, 4096, 8, "fla_parallel_based"), 4, "x"),
                         goal("fwd ≤ 0.25 ms", get(64, 4096, 8, "fwd"), 0.25, "ms", True),
                         goal("fwd+bwd B16 T2048 ≥ 1.5x FA2", ratio(64, 2048, 16, "fa2_sdpa"), 1.5, "x"),
                         goal("d_v 128 B8 T4096 fwd+bwd ≥ 3x FA2", ratio(128, 4096, 8, "fa2_sdpa"), 3, "x")])]
    svg = svg_bars(f"Taylor linear attention, {doc.get('gpu', '')}: median ms (lower is better)", "ms",
                   [f"d_v {k[0]} T {k[1] // 1024}k\n{'fwd+bwd' if k[3] == 'fwdbwd' else 'fwd'}" for k in order],
                   ["ours", *TAYLOR_PEERS.values()], [[rows[k].get(p) for p in ("ours", *TAYLOR_PEERS)] for k in order])
    return lines, svg


def sliding_window(path: Path) -> tuple[list[str], str]:
    doc = json.loads(path.read_text())
    meta, rows = doc.get("meta", {}), doc.get("rows", [])
    shape = lambda r: f"B{r['B']} T{r['T']} H{r['H']} D{r['D']} W{r['W']}"  # noqa: E731
    # the kernels' device time (torch.profiler's sum per call) beside the eager median, whose host part (Python,
    # launches) varies with the machine's CPU: the goal is judged on device time where every row has it
    device = bool(rows) and all(r.get("ours_fwdbwd_device_ms") and r.get("flex_fwdbwd_device_ms") for r in rows)
    lines = [env(meta, shown(path), f"{meta.get('dtype', '?')}, eager median ms"
                                    f"{' and device ms (the kernels, torch.profiler)' if device else ''}; ours and "
                                    "FlexAttention (compiled, sliding-window block mask) timed in one process "
                                    "(`benchmarks/sliding_window.py`)"), "",
             "| B | T | H | D | W | ours fwd ms | Flex fwd ms | speedup | ours fwd+bwd ms | Flex fwd+bwd ms | "
             "speedup |" + (" ours device ms | Flex device ms | device speedup |" if device else ""),
             "|---|---|---|---|---|---|---|---|---|---|---|" + ("---|---|---|" if device else "")]
    metrics = ("fwd", "fwdbwd", "fwdbwd_device") if device else ("fwd", "fwdbwd")
    for r in rows:
        cells = [f"{fmt(r.get(f'ours_{m}_ms'))} | {fmt(r.get(f'flex_{m}_ms'))} | "
                 f"{speedup(r.get(f'flex_{m}_ms'), r.get(f'ours_{m}_ms'))}" for m in metrics]
        lines.append(f"| {r['B']} | {r['T']:,} | {r['H']} | {r['D']} | {r['W']} | {' | '.join(cells)} |")
    lines += [f"- FlexAttention failed at {shape(r)}: `{r['flex_error'][:100]}`" for r in rows if r.get("flex_error")]
    m = metrics[-1]
    ratios = {shape(r): r[f"flex_{m}_ms"] / r[f"ours_{m}_ms"] for r in rows
              if r.get(f"flex_{m}_ms") and r.get(f"ours_{m}_ms")}
    worst = min(ratios, key=ratios.get) if ratios else None
    note = f" (the lowest, {worst}; {sum(v >= 1.6 for v in ratios.values())} of {len(rows)} shapes reach 1.6x)" \
        if worst else ""
    lines += ["", goals([goal(f"fwd+bwd ≥ 1.6x FlexAttention at every shape{' (device time)' if device else ''}",
                              ratios[worst] if worst else None, 1.6, "x", note=note,
                              complete=len(ratios) == len(rows))])]
    groups = [f"B{r['B']} T{r['T'] // 1024}k D{r['D']}\nW{r['W']} {m}" for r in rows for m in ("fwd", "fwd+bwd")]
    values = [[r.get(f"{p}_{m}_ms") for p in ("ours", "flex")] for r in rows for m in ("fwd", "fwdbwd")]
    svg = svg_bars(f"Sliding-window attention, {meta.get('gpu', '')}: median ms (lower is better)", "ms", groups,
                   ["ours", "FlexAttention"], values)
    return lines, svg


def training(path: Path) -> tuple[list[str], str]:
    meta, rows = load([str(path)])
    rows = single_gpu(rows)
    graphed = lambda r: r.get("cuda_graphs") not in (None, False, "none")  # noqa: E731
    pick = lambda model, seq, graphs: next((r for r in rows if ok(r) and r["model"] == model and r["seq"] == seq
                                            and graphed(r) == graphs and r.get("rope_fusion") is not False),
                                           None)  # noqa: E731
    tok = lambda model, graphs: (pick(model, 8192, graphs) or {}).get("tokens_per_s_per_gpu")  # noqa: E731
    ratio = lambda graphs: tok("based-360m", graphs) / tok("gpt-360m", graphs) \
        if tok("based-360m", graphs) and tok("gpt-360m", graphs) else None  # noqa: E731
    best = max(filter(None, (pick("based-360m", 8192, g) for g in (True, False))), key=lambda r: r.get("mfu") or 0,
               default=None)
    lines = [env(meta, shown(path), "bf16, Megatron DDP + distributed optimizer, BASED and the same-size GPT in "
                                    "one `benchmarks/train_throughput.py` process per setting; \"+graphs\": "
                                    "Megatron-Core's per-layer CUDA graphs; MFU against the dense bf16 peak"), "",
             throughput_table(rows), "",
             goals([goal("based-360m at 8k ≥ 2.0x GPT with graphs", ratio(True), 2.0, "x"),
                    goal("≥ 1.8x eager", ratio(False), 1.8, "x"),
                    goal("MFU ≥ 50%", best and best.get("mfu"), 0.5, "%",
                         note=best and (" (graphs)" if graphed(best) else " (eager)"))])]
    cases = sorted({(r["seq"], graphed(r)) for r in rows if ok(r)})
    models = sorted({r["model"] for r in rows if ok(r)}, key=lambda m: (m.startswith("gpt"), m))
    groups = [f"T {seq // 1024}k\n{'graphs' if g else 'eager'}"
              + (" recompute" if any(r.get("recompute") for r in rows if r["seq"] == seq and graphed(r) == g) else "")
              for seq, g in cases]
    values = [[(pick(m, seq, g) or {}).get("tokens_per_s_per_gpu", 0) / 1e3 or None for m in models]
              for seq, g in cases]
    svg = svg_bars(f"Training throughput, {meta.get('device', '')}: tokens/s per GPU (higher is better)",
                   "tokens/s per GPU (thousands)", groups, models, values, "k")
    return lines, svg


def generation(path: Path) -> tuple[list[str], str]:
    doc = json.loads(path.read_text())
    meta, rows = doc.get("meta", {}), doc.get("results", [])
    done = [r for r in rows if "decode_tokens_per_s" in r]
    gpt = max((r["decode_tokens_per_s"] for r in done if r["model"].startswith("GPT")), default=None)
    mib = lambda b: "-" if b is None else f"{b / 2**20:,.1f}"  # noqa: E731
    lines = [env(meta, shown(path), f"`{meta.get('config', '?')}` and a same-size GPT (random weights), "
                                    f"{meta.get('dtype', '?').removeprefix('torch.')}, both in one "
                                    "`benchmarks/generation.py` process; vs GPT: decode tokens/s over the GPT's "
                                    "fastest"), "",
             "| model | CUDA graphs | batch | prompt | new tokens | prefill ms | decode tokens/s | vs GPT | "
             "cache MiB/seq | peak MiB/seq | guard |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        graphs = "yes" if r.get("cuda_graph") else "no"
        if "decode_tokens_per_s" not in r:
            lines.append(f"| {r['model']} | {graphs} | | | | {r.get('error', '?')[:80].replace('|', '/')} | | | | | |")
            continue
        lines.append(f"| {r['model']} | {graphs} | {r['batch']} | {r['prompt_length']} | {r['new_tokens']} | "
                     f"{1e3 * r['prefill_s']:.1f} | {r['decode_tokens_per_s']:,.0f} | "
                     f"{speedup(r['decode_tokens_per_s'], gpt)} | {mib(r.get('cache_bytes_per_sequence'))} | "
                     f"{mib(r.get('peak_bytes_per_sequence'))} | "
                     f"{'passed' if r.get('guard', {}).get('passed') else 'failed'} |")
    ours = max((r for r in done if r["model"] == "BASED" and r["batch"] == 128 and r["prompt_length"] == 128
                and "based-1.3b" in meta.get("config", "")), key=lambda r: r["decode_tokens_per_s"], default=None)
    lines += ["", goals([goal("based-1.3b decode ≥ 60k tokens/s at batch 128, prompt 128",
                              ours and ours["decode_tokens_per_s"], 60_000, "tok/s",
                              note=ours and (" (CUDA graphs)" if ours["cuda_graph"] else " (eager)"))])]
    cases = sorted({bool(r.get("cuda_graph")) for r in done}, reverse=True)
    models = list(dict.fromkeys(r["model"] for r in done))
    values = [[next((r["decode_tokens_per_s"] / 1e3 for r in done if r["model"] == m
                     and bool(r.get("cuda_graph")) == g), None) for m in models] for g in cases]
    svg = svg_bars(f"Decode, {meta.get('device', '')}: tokens/s (higher is better)", "decode tokens/s (thousands)",
                   ["CUDA-graphed decode" if g else "eager decode" for g in cases], models, values, "k")
    return lines, svg


# (JSON, SVG, heading, the command that writes the JSON, the section's function)
AREAS = [("taylor_attention.json", "speed_taylor.svg", "Taylor linear attention vs fla and FlashAttention-2",
          f"`{SPEED_GPU}`", taylor),
         ("sliding_window.json", "speed_swa.svg", "Sliding-window attention vs FlexAttention", f"`{SPEED_GPU}`",
          sliding_window),
         ("train_throughput.json", "speed_training.svg", "End-to-end training, based-360m vs GPT-360m",
          "`python benchmarks/train_throughput.py --models based-360m gpt-360m --seq 8192` (then again with "
          "`--cuda-graphs --append`)", training),
         ("generation.json", "speed_decode.svg", "Generation (decode), based-1.3b vs GPT-1.3b", f"`{SPEED_GPU}`",
          generation)]


def shown(path: Path) -> str:
    return str(path.relative_to(REPO)) if path.is_relative_to(REPO) else str(path)


def render(results: Path) -> tuple[str, dict[str, str]]:
    """(the doc block, {SVG file name: its text})."""
    lines, svgs = [BEGIN, "## Speed, latest per area", "",
                   "Generated by `python benchmarks/speed_report.py` from the JSONs in "
                   f"`{shown(results)}` (`--check` compares; a test keeps this block and the plots in sync). Each "
                   "peer ran in the same process as ours; \"speedup\" is the peer's time over ours."], {}
    for name, svg_name, heading, command, section in AREAS:
        path = results / name
        lines += ["", f"### {heading}", ""]
        if not path.exists():
            lines.append(f"`{shown(path)}` is missing: {command} writes it.")
            continue
        body, svgs[svg_name] = section(path)
        lines += body + ["", f"![{heading}]({svg_name})"]
    return "\n".join(lines + ["", END]), svgs


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--results", type=Path, default=REPO / "benchmarks" / "results")
    p.add_argument("--doc", type=Path, default=REPO / "docs" / "benchmarks.md")
    p.add_argument("--check", action="store_true", help="exit 1 when the doc block or an SVG is out of date")
    args = p.parse_args(argv)
    block, svgs = render(args.results.resolve())
    old = args.doc.read_text() if args.doc.exists() else ""
    files = {args.doc: with_block(old, block, BEGIN, END, before_first_section=True), **{args.doc.parent / n: t for n, t in svgs.items()}}
    stale = [f for f, text in files.items() if not f.exists() or f.read_text() != text]
    if args.check:
        if stale:
            print(f"out of date with {shown(args.results.resolve())}: {', '.join(shown(f.resolve()) for f in stale)} "
                  "(run python benchmarks/speed_report.py)")
            return 1
        return 0
    for f in stale:
        f.parent.mkdir(parents=True, exist_ok=True)
        f.write_text(files[f])
        print(f"wrote {f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
