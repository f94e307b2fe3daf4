"""MQAR recall vs decode-state size (the BASED paper's recall-memory trade-off) for BaseConv-only, Taylor-LA-only,
SWA-only and BASED-mix models, trained from scratch on CPU (or GPU) with megatron_based.tasks.mqar.

    python benchmarks/mqar.py                # the sweep below (~10-20 min on 2 CPU cores)
    python benchmarks/mqar.py --quick        # 2 sizes per family, fewer steps (a few minutes)

State size is the bytes of generation cache one sequence needs (megatron_based.inference.generation), fp32. Prints a
table, writes JSON and a PNG plot (recall vs state bytes, log scale), drawn with Pillow.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

import torch


# family -> [(layer pattern, hidden size, swa window)]; state grows with width (C, L) or window (S).
SWEEP = {
    "BaseConv": [("CC", d, 8) for d in (32, 64, 128)],
    "Taylor LA": [("LL", d, 8) for d in (32, 64, 128)],
    "SWA": [("SS", 64, w) for w in (4, 16, 64)],
    "BASED (C+L+S)": [("CLS", d, 8) for d in (32, 64, 128)],
}
COLORS = {"BaseConv": (214, 39, 40), "Taylor LA": (31, 119, 180), "SWA": (44, 160, 44),
          "BASED (C+L+S)": (148, 103, 189)}


def plot(results: list[dict], path: str, title: str) -> None:
    """Recall (y) vs state bytes (x, log2), one polyline per family."""
    from PIL import Image, ImageDraw

    W, H, left, right, top, bottom = 900, 560, 80, 220, 50, 60
    img = Image.new("RGB", (W, H), "white")
    draw = ImageDraw.Draw(img)
    xs = [math.log2(r["state_bytes"]) for r in results]
    x0, x1 = math.floor(min(xs)), math.ceil(max(xs))
    x1 = max(x1, x0 + 1)
    px = lambda b: left + (math.log2(b) - x0) / (x1 - x0) * (W - left - right)  # noqa: E731
    py = lambda r: H - bottom - r * (H - top - bottom)  # noqa: E731
    draw.rectangle([left, top, W - right, H - bottom], outline="black")
    for e in range(x0, x1 + 1):
        x = px(2 ** e)
        draw.line([x, H - bottom, x, H - bottom + 5], fill="black")
        label = f"{2 ** e / 1024:g}K" if e >= 10 else str(2 ** e)
        draw.text((x - 10, H - bottom + 8), label, fill="black")
    for i in range(6):
        y = py(i / 5)
        draw.line([left - 5, y, left, y], fill="black")
        draw.text((left - 35, y - 6), f"{i / 5:.1f}", fill="black")
    draw.text((W // 2 - 120, H - 25), "decode state per sequence (bytes, log scale)", fill="black")
    draw.text((10, top - 30), "MQAR recall", fill="black")
    draw.text((left, 15), title, fill="black")
    for k, family in enumerate(SWEEP):
        pts = sorted((px(r["state_bytes"]), py(r["recall"])) for r in results if r["family"] == family)
        color = COLORS[family]
        if len(pts) > 1:
            draw.line(pts, fill=color, width=3)
        for x, y in pts:
            draw.ellipse([x - 4, y - 4, x + 4, y + 4], fill=color)
        ly = top + 20 + 25 * k
        draw.line([W - right + 15, ly, W - right + 45, ly], fill=color, width=3)
        draw.text((W - right + 52, ly - 6), family, fill="black")
    img.save(path)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--vocab-size", type=int, default=128)
    p.add_argument("--seq-len", type=int, default=64)
    p.add_argument("--num-kv-pairs", type=int, default=8)
    p.add_argument("--steps", type=int, default=400)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--quick", action="store_true", help="2 sizes per family, 150 steps")
    p.add_argument("--json", default="benchmarks/results/mqar.json")
    p.add_argument("--png", default="benchmarks/results/mqar.png")
    args = p.parse_args(argv)
    sweep = {f: (runs[::2] if args.quick else runs) for f, runs in SWEEP.items()}
    if args.quick:
        args.steps = 150

    os.environ.setdefault("MASTER_PORT", str(29500 + os.getpid() % 1000))
    from megatron_based.tasks.mqar import MQARTask, build_mqar_model, evaluate_mqar, mqar_batch, state_bytes_per_sequence, \
        train_mqar
    from megatron_based.runtime.parallel import initialize_parallel

    initialize_parallel(1)
    task = MQARTask(args.vocab_size, args.seq_len, args.num_kv_pairs)
    test = mqar_batch(task, 1000, torch.Generator().manual_seed(12345))
    results = []
    for family, runs in sweep.items():
        for pattern, hidden, window in runs:
            torch.manual_seed(0)
            model = build_mqar_model(pattern, hidden_size=hidden, num_heads=4, feature_dim=8, swa_window=window,
                                     vocab_size=args.vocab_size, seq_len=args.seq_len)
            t0 = time.perf_counter()
            losses = train_mqar(model, task, steps=args.steps, batch_size=args.batch_size, lr=args.lr)
            device = next(model.parameters()).device
            recall = evaluate_mqar(model, *(t.to(device) for t in test))
            results.append({"family": family, "layer_pattern": pattern, "hidden_size": hidden, "swa_window": window,
                            "state_bytes": state_bytes_per_sequence(model), "recall": recall,
                            "final_loss": sum(losses[-20:]) / len(losses[-20:]),
                            "train_s": time.perf_counter() - t0})
            r = results[-1]
            print(f"{family:14s} {pattern:4s} d={hidden:4d} window={window:3d}  state {r['state_bytes']:8d} B  "
                  f"recall {recall:.3f}  loss {r['final_loss']:.3f}  ({r['train_s']:.0f} s)", flush=True)

    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"MQAR: vocab {args.vocab_size}, {args.seq_len} tokens, {args.num_kv_pairs} pairs, "
                        f"{args.steps} steps (chance {task.chance:.3f})")
    for col in ("family", "pattern", "d", "window", "state bytes/seq", "recall"):
        table.add_column(col)
    for r in results:
        table.add_row(r["family"], r["layer_pattern"], str(r["hidden_size"]),
                      str(r["swa_window"]) if "S" in r["layer_pattern"] else "-", f"{r['state_bytes']:,}",
                      f"{r['recall']:.3f}")
    Console(width=120).print(table)
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    meta = {"task": vars(task) if hasattr(task, "__dict__") else str(task), "steps": args.steps,
            "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
            "date": time.strftime("%Y-%m-%d")}
    Path(args.json).write_text(json.dumps({"meta": meta, "results": results}, indent=1, default=str))
    plot(results, args.png, f"MQAR recall vs state ({args.seq_len} tokens, {args.num_kv_pairs} pairs, "
                            f"{args.steps} steps)")
    print(f"wrote {args.json} and {args.png}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
