"""Tables and a PNG from train_throughput.py's JSON: tokens/s vs sequence length, BASED vs GPT.

    python benchmarks/plot_throughput.py benchmarks/results/train_throughput.json [more.json ...] \
        --png benchmarks/results/train_throughput.png --markdown out.md

Markdown (stdout or --markdown): the throughput table with each BASED row's ratio to its same-size GPT, the
per-layer-type profile (ms per step of device time), the top kernels of each profiled case, and, for rows run
with CP or TP > 1, the scaling efficiency against the matching one-GPU row. The PNG needs only pillow (the bench
extra), so it can be drawn on a machine without matplotlib.
"""
from __future__ import annotations

import argparse
import json
import math
import sys

COLORS = [(31, 119, 180), (214, 39, 40), (44, 160, 44), (148, 103, 189), (255, 127, 14), (140, 86, 75)]
# Columns of the profile table: label -> the profile labels summed into it (comm/* is summed separately).
PROFILE_COLUMNS = {"L": ["L"], "S": ["S"], "C": ["C"], "A": ["A"], "MLP": ["MLP"], "norm": ["norm"],
                   "residual": ["residual"], "embedding": ["embedding"], "head+loss": ["head+loss"],
                   "graphed layers": ["graphed layers"], "grad-accum": ["grad-accum"],
                   "optimizer": ["optimizer", "zero-grad", "grad-sync"],
                   "other": ["other"]}


def load(paths: list[str]) -> tuple[dict, list[dict]]:
    """(meta of the first file, rows of all files; a later row for the same case replaces an earlier one)."""
    meta, rows = None, {}
    for path in paths:
        with open(path) as fh:
            doc = json.load(fh)
        if not isinstance(doc, dict) or not isinstance(doc.get("results"), list):
            raise SystemExit(f"{path}: not a train_throughput.py JSON (no 'results' list)")
        meta = meta or doc.get("meta", {})
        for r in doc["results"]:
            rows[case_key(r)] = r
    return meta or {}, list(rows.values())


def variant(r: dict) -> str:
    """How a row ran beyond the defaults (rows of different variants are different cases): CUDA-graphed layers,
    Megatron's unfused RoPE. Empty for the defaults."""
    return (" +graphs" if r.get("cuda_graphs") not in (None, False, "none") else "") + (
        " unfused-rope" if r.get("rope_fusion") is False else "")


def name(r: dict) -> str:
    return r["model"] + variant(r)


def case_key(r: dict) -> tuple:
    return (name(r), r["seq"], r.get("tp", 1), r.get("cp", 1), r.get("local_seq", r["seq"] // r.get("cp", 1)),
            r.get("tokens_per_step"))


def ok(r: dict) -> bool:
    return not r.get("oom") and not r.get("error") and "tokens_per_s_per_gpu" in r


def baseline_of(model: str) -> str | None:
    """The same-size softmax GPT a BASED model is compared with (based-360m -> gpt-360m, tiny -> gpt-tiny)."""
    return None if model.startswith("gpt-") else "gpt-" + model.removeprefix("based-")


def single_gpu(rows: list[dict]) -> list[dict]:
    return [r for r in rows if r.get("tp", 1) == 1 and r.get("cp", 1) == 1]


def throughput_table(rows: list[dict]) -> str:
    out = ["| model | T | tokens/step | recompute | tokens/s/GPU | model TFLOP/s | MFU | peak GiB | loss first->last "
           "| BASED / GPT |", "|---|---|---|---|---|---|---|---|---|---|"]
    ref = {(name(r), r["seq"], r.get("tokens_per_step")): r for r in single_gpu(rows) if ok(r)}
    for r in sorted(single_gpu(rows), key=lambda r: (r["model"].startswith("gpt"), name(r), r["seq"])):
        rc = "yes" if r.get("recompute") else "no"
        if not ok(r):
            what = "OOM" if r.get("oom") else f"error: {r.get('error', '?')[:80]}"
            out.append(f"| {name(r)} | {r['seq']:,} | | {rc} | {what} | | | | | |")
            continue
        base = ref.get((f"{baseline_of(r['model'])}{variant(r)}", r["seq"], r.get("tokens_per_step")))
        ratio = f"**{r['tokens_per_s_per_gpu'] / base['tokens_per_s_per_gpu']:.2f}x**" if base else ""
        if base and base.get("recompute") != r.get("recompute"):
            ratio += " (GPT recompute)" if base.get("recompute") else " (GPT without recompute)"
        mfu = f"{100 * r['mfu']:.1f}%" if r.get("mfu") else "-"
        mem = f"{r['peak_mem_gib']:.1f}" if r.get("peak_mem_gib") else "-"
        guard = "" if r["loss_ok"] else " **guard failed**"
        out.append(f"| {name(r)} | {r['seq']:,} | {r.get('tokens_per_step', '')} | {rc} | "
                   f"{r['tokens_per_s_per_gpu']:,.0f} | {r['tflops_per_gpu']:.1f} | {mfu} | {mem} | "
                   f"{r['loss_first']:.3f}->{r['loss_last']:.3f}{guard} | {ratio} |")
    return "\n".join(out)


def profile_table(rows: list[dict]) -> str:
    prof = [r for r in rows if ok(r) and r.get("profile")]
    if not prof:
        return ""
    cols = [c for c, labels in PROFILE_COLUMNS.items()
            if any(lab in r["profile"]["by_type"] for r in prof for lab in labels)]
    out = ["| model | T | tokens/step | tp | cp | step ms | profiled ms | " + " | ".join(cols)
           + " | comm | unattributed |",
           "|---|---|---|---|---|---|---|" + "---|" * (len(cols) + 2)]
    for r in prof:
        p = r["profile"]
        by = {lab: v["total"] for lab, v in p["by_type"].items()}
        total = p.get("device_total_ms", p["attributed_ms"])
        cell = lambda ms: f"{ms:.1f} ({100 * ms / total:.0f}%)" if ms else "-"  # noqa: E731
        comm = sum(v for lab, v in by.items() if lab.startswith("comm/"))
        vals = [cell(sum(by.get(lab, 0.0) for lab in PROFILE_COLUMNS[c])) for c in cols]
        out.append(f"| {name(r)}{' (recompute)' if r.get('recompute') else ''} | {r['seq']:,} | {r.get('tokens_per_step', '')} | {r['tp']} | {r['cp']} | "
                   f"{r['step_ms']:.1f} | {total:.1f} | "
                   + " | ".join(vals) + f" | {cell(comm)} | {p.get('unattributed_ms', 0):.1f} |")
    return "\n".join(out)


def kernel_lists(rows: list[dict], n: int) -> str:
    if n <= 0:
        return ""
    out = []
    for r in rows:
        if ok(r) and r.get("profile"):
            top = r["profile"]["top_kernels"][:n]
            ks = "; ".join(f"`{k['name'][:70]}` {k['ms']:.1f} ms ({k['type']})" for k in top)
            out.append(f"- {name(r)} T={r['seq']:,} tp={r['tp']} cp={r['cp']}: {ks}")
    return "\n".join(out)


def scaling_table(rows: list[dict]) -> str:
    """CP rows vs the one-GPU row at their local length (weak scaling), TP rows vs the one-GPU row at the same
    length; both at the same tokens per GPU and step. Efficiency = tokens/s/GPU over the one-GPU value."""
    one = {(name(r), r["seq"], r.get("tokens_per_step")): r for r in single_gpu(rows) if ok(r)}
    out = []
    for r in rows:
        if r.get("tp", 1) == 1 and r.get("cp", 1) == 1:
            continue
        base = one.get((name(r), r.get("local_seq", r["seq"]), r.get("tokens_per_step")))
        if not ok(r) or base is None:
            why = "OOM" if r.get("oom") else r.get("error") or "no matching one-GPU row"
            out.append(f"| {r['model']} | {r['seq']:,} | {r['tp']} | {r['cp']} | {why} | | | |")
            continue
        comm = sum(v["total"] for lab, v in r.get("profile", {}).get("by_type", {}).items() if lab.startswith("comm/"))
        out.append(f"| {r['model']} | {r['seq']:,} | {r['tp']} | {r['cp']} | {r['tokens_per_s_per_gpu']:,.0f} | "
                   f"{base['tokens_per_s_per_gpu']:,.0f} (T={base['seq']:,}) | "
                   f"**{r['tokens_per_s_per_gpu'] / base['tokens_per_s_per_gpu']:.1%}** | {comm:.1f} |")
    if not out:
        return ""
    return "\n".join(["| model | T (global) | tp | cp | tokens/s/GPU | one GPU | efficiency | comm ms/step |",
                      "|---|---|---|---|---|---|---|---|"] + out)


def plot(rows: list[dict], path: str, title: str) -> None:
    """tokens/s per GPU (y) vs sequence length (x, log2), one line per model; hollow = recompute, OOM marked."""
    from PIL import Image, ImageDraw, ImageFont

    rows = single_gpu(rows)
    if not rows:
        raise SystemExit("no one-GPU rows to plot")
    W, H, left, right, top, bottom = 940, 560, 90, 240, 50, 60
    img = Image.new("RGB", (W, H), "white")
    draw = ImageDraw.Draw(img)
    try:
        draw.font = ImageFont.load_default(size=13)
    except (TypeError, OSError):  # a pillow without FreeType: the small bitmap font
        pass
    xs = [math.log2(r["seq"]) for r in rows]
    e0, e1 = math.floor(min(xs)), math.ceil(max(xs))
    x0, x1 = e0 - 0.3, max(e1, e0 + 1) + 0.3  # a margin so no point sits on the frame
    ymax = max([r["tokens_per_s_per_gpu"] for r in rows if ok(r)] or [1.0])
    step = 10 ** math.floor(math.log10(ymax))
    step = next(s * step for s in (1, 2, 5, 10) if ymax / (s * step) <= 6)
    ytop = step * math.ceil(ymax * 1.08 / step)
    px = lambda t: left + (math.log2(t) - x0) / (x1 - x0) * (W - left - right)  # noqa: E731
    py = lambda v: H - bottom - v / ytop * (H - top - bottom)  # noqa: E731
    draw.rectangle([left, top, W - right, H - bottom], outline="black")
    for e in range(e0, max(e1, e0 + 1) + 1):
        x = px(2 ** e)
        draw.line([x, H - bottom, x, H - bottom + 5], fill="black")
        draw.text((x - 10, H - bottom + 8), f"{2 ** e // 1024}k" if e >= 10 else str(2 ** e), fill="black")
    v = 0.0
    while v <= ytop + 1e-9:
        y = py(v)
        draw.line([left - 5, y, left, y], fill="black")
        draw.line([left + 1, y, W - right - 1, y], fill=(230, 230, 230))
        draw.text((left - 60, y - 6), f"{v / 1000:,.0f}k" if ytop >= 10000 else f"{v:,.0f}", fill="black")
        v += step
    draw.text((W // 2 - 140, H - 28), "sequence length T (tokens, log scale)", fill="black")
    draw.text((10, top - 20), "training tokens/s per GPU", fill="black")
    draw.text((left, 8), title, fill="black")
    models = sorted({name(r) for r in rows}, key=lambda m: (m.startswith("gpt"), m))
    for k, model in enumerate(models):
        color = COLORS[k % len(COLORS)]
        mine = sorted((r for r in rows if name(r) == model), key=lambda r: r["seq"])
        pts = [(px(r["seq"]), py(r["tokens_per_s_per_gpu"]), r) for r in mine if ok(r)]
        if len(pts) > 1:
            draw.line([(x, y) for x, y, _ in pts], fill=color, width=3)
        for x, y, r in pts:
            box = [x - 5, y - 5, x + 5, y + 5]
            draw.ellipse(box, fill="white" if r.get("recompute") else color, outline=color, width=2)
            tok = r["tokens_per_s_per_gpu"]
            draw.text((x + 9, y - 16 - 12 * (k % 2)), f"{tok / 1000:.0f}k" if ytop >= 10000 else f"{tok:,.0f}",
                      fill=color)
        for r in mine:
            if not ok(r):
                x, y = px(r["seq"]), H - bottom - 14 - 14 * k
                draw.line([x - 5, y - 5, x + 5, y + 5], fill=color, width=2)
                draw.line([x - 5, y + 5, x + 5, y - 5], fill=color, width=2)
                draw.text((x + 8, y - 6), "OOM" if r.get("oom") else "error", fill=color)
        ly = top + 20 + 25 * k
        draw.line([W - right + 15, ly, W - right + 45, ly], fill=color, width=3)
        draw.text((W - right + 52, ly - 6), model, fill="black")
    if not any(r.get("recompute") for r in rows):
        img.save(path)
        return
    ly = top + 20 + 25 * len(models)
    draw.ellipse([W - right + 25, ly - 5, W - right + 35, ly + 5], fill="white", outline="black", width=2)
    draw.text((W - right + 52, ly - 6), "full recompute", fill="black")
    img.save(path)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("json", nargs="+", help="train_throughput.py output(s); later files override the same case")
    p.add_argument("--png", help="write the plot here (needs pillow)")
    p.add_argument("--markdown", help="write the tables here (default: stdout)")
    p.add_argument("--kernels", type=int, default=8, help="top kernels listed per profiled case")
    args = p.parse_args(argv)
    meta, rows = load(args.json)
    date, device = meta.get("date", ""), meta.get("device", "")
    parts = [f"{device}, torch {meta.get('torch', '?')}, {date}", throughput_table(rows), profile_table(rows),
             kernel_lists(rows, args.kernels), scaling_table(rows)]
    text = "\n\n".join(s for s in parts if s) + "\n"
    if args.markdown:
        with open(args.markdown, "w") as fh:
            fh.write(text)
    else:
        sys.stdout.write(text)
    if args.png:
        dtype = "fp32" if device == "cpu" else "bf16"
        plot(rows, args.png, f"Training throughput, {dtype}, one {'CPU process' if device == 'cpu' else 'GPU'}: "
                             f"{device} ({date})")
        print(f"wrote {args.png}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
