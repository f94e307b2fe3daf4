"""The published MQAR grid (Zoology / the BASED paper), run with ``megatron-based-mqar train``: recall vs state size.

    python benchmarks/mqar_sweep.py                      # the grid on this machine's GPU, resumable
    python benchmarks/mqar_sweep.py --time-limit 540     # stop cleanly before a 10-minute call ends; rerun continues
    python benchmarks/mqar_sweep.py --report-only        # rewrite the table and the plot from the JSON
    python benchmarks/mqar_sweep.py --smoke --out-dir /tmp/mqar   # the whole pipeline on CPU in ~30 s

Grid: 21 cells x learning rates (``--lrs``, default 3e-3, 1e-3, 1e-2; the best run of a cell is its result):

* attention: layer 0 BaseConv (short conv, k 3), layer 1 softmax attention (pattern CA), d 64 / 128 / 256
* BaseConv: Zoology's figure-2 model, its BaseConv with a short convolution (k 3), then with a long implicit one
  (ZH, kernel sizes [3, -1]), d 64 / 128 / 256
* BaseConv as run for figure 2: the same model as Zoology's code built it for the published runs, 4 blocks of two
  BaseConv mixers (ZZHHZZHH), d 64 / 128 / 256
* the same with Zoology's explicit long filters (``implicit_long_conv=False``: a free filter per channel, the E
  mixer; ZZEEZZEE), d 64 / 128 / 256: the launch behind the published points ran one of the two (docs/mqar.md)
* BASED: layer 0 BaseConv, layer 1 Taylor linear attention (CL), d 64 / 128 / 256 x feature dim f 8 / 16 / 24

every model with 1 head, no MLPs, tied embeddings; the data and training are ``megatron_based.tasks.mqar``'s
defaults, the published setting: vocabulary 8192, 256 tokens, 16 key-value pairs, 100k training / 3k test
sequences, batch 256, AdamW (weight decay 0.1), cosine over up to 64 epochs, early stop after the first epoch with
test accuracy > 0.99. Once a run of a cell passes the early stop, the cell's other learning rates are skipped
(the queue runs every cell's first learning rate before any cell's second).

Each run is one ``megatron-based-mqar train`` process (``--jobs`` of them at a time, sharing the GPU: the models
are far too small to fill it, so the runs are bound by kernel launches and overlap well). A run's result goes
into ``--json`` (default benchmarks/results/mqar.json) as soon as it ends, and a run already there is skipped
unless ``--force``: a call cut short loses only its unfinished runs, and the next call continues. ``--time-limit``
stops the sweep cleanly before the caller's limit (outputs written), and starts no run that the longest one so far
says would not finish in the time left. A run it stops is not a result: its last epoch's test accuracy goes under
``"cut"`` in the JSON (the table shows it marked, the plot as a square), and the next call reruns it.
After every run the markdown table (ours beside the published numbers) is rewritten between the
``<!-- mqar-sweep:begin -->`` / ``<!-- mqar-sweep:end -->`` lines of ``--doc`` (docs/mqar.md), and the recall vs
state-size plot is written as a hand-written SVG (``--svg``, docs/mqar_recall_vs_state.svg; no plotting
library needed).

Each full batch's training step is one CUDA graph replay (``megatron-based-mqar train``'s default on GPU, kept
here; ``train_mqar(cuda_graph=...)``, docs/mqar.md). Measured on one H200 with 8 runs at a time: 20-30 s of
start-up per run (data, Triton compilation, graph capture), then ~7 s per epoch at d 64 and ~20 s at d 256 for
BaseConv, up to ~100 s for BASED at d 256, f 24. Runs that pass the early stop take 2-4 epochs (23-240 s); a run
that never does (BaseConv) takes all 64 epochs, 8-20 minutes, more than one 10-minute call (docs/mqar.md).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import re
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from bench_utils import with_block
from megatron_based.tasks.cli import MODELS  # model name -> layer pattern, as megatron-based-mqar --model builds it

REPO = Path(__file__).resolve().parents[1]
LABELS = {"attention": "attention", "baseconv": "BaseConv", "baseconv-fig2": "BaseConv, fig. 2 runs",
          "baseconv-fig2-explicit": "BaseConv, fig. 2 runs, explicit filters",
          "based": "BASED"}
# The published recall at T 256, 16 pairs (Zoology figure 2 / the BASED paper, as quoted in issue 20).
PUBLISHED = {("attention", 64): 1.0, ("attention", 128): 1.0, ("attention", 256): 1.0,
             ("baseconv", 64): 0.14, ("baseconv", 128): 0.34, ("baseconv", 256): 0.81}
# the fig. 2 models (implicit or explicit filters) are the ones those published BaseConv points came from: same numbers
PUBLISHED |= {(fig2, d): acc for (model, d), acc in list(PUBLISHED.items()) if model == "baseconv"
              for fig2 in ("baseconv-fig2", "baseconv-fig2-explicit")}
FULL = {"vocab_size": 8192, "seq_len": 256, "num_kv_pairs": 16, "num_train": 100_000, "num_test": 3000,
        "epochs": 64, "batch_size": 256, "weight_decay": 0.1, "early_stop": 0.99}
SMOKE = {"vocab_size": 64, "seq_len": 32, "num_kv_pairs": 4, "num_train": 128, "num_test": 32,
         "epochs": 1, "batch_size": 32, "weight_decay": 0.1, "early_stop": 0.99}
DEFAULT_LRS = "3e-3,1e-3,1e-2"
# How the runs behind the published figure were trained (Zoology's code at the launches the figure reads,
# Oct/Nov 2023: zoology/experiments/d_model.py and zoology/train.py at commit 8486daf): batch 1024 for T <= 256,
# AdamW built with the learning rate only (torch's default weight decay, 0.01), ModelConfig's embed_dropout 0.1, and
# the learning rates np.logspace(-4, -2, 4). docs/mqar.md, "Which model the published BaseConv numbers come from".
FIG2_TRAINING = {"batch_size": 1024, "weight_decay": 0.01, "embed_dropout": 0.1}
FIG2_LRS = "1e-2,2.15e-3,4.64e-4,1e-4"
BEGIN, END = "<!-- mqar-sweep:begin -->", "<!-- mqar-sweep:end -->"


def grid(smoke: bool) -> list[dict]:
    """The cells: ``{"model", "d", "f"}`` (f None for models without L layers)."""
    if smoke:
        return [{"model": "attention", "d": 16, "f": None}, {"model": "baseconv", "d": 16, "f": None},
                {"model": "based", "d": 16, "f": 4}]
    widths = (64, 128, 256)
    return ([{"model": "attention", "d": d, "f": None} for d in widths]
            + [{"model": "baseconv", "d": d, "f": None} for d in widths]
            + [{"model": "baseconv-fig2", "d": d, "f": None} for d in widths]
            + [{"model": "baseconv-fig2-explicit", "d": d, "f": None} for d in widths]
            + [{"model": "based", "d": d, "f": f} for d in widths for f in (8, 16, 24)])


def cell_key(cell: dict) -> str:
    return f"{cell['model']}-d{cell['d']}" + (f"-f{cell['f']}" if cell["f"] else "")


def run_key(cell: dict, lr: float) -> str:
    return f"{cell_key(cell)}-lr{lr:g}"


def of_cell(entries: dict, cell: dict) -> list[dict]:
    """The entries (run key -> record, as ``data["runs"]`` or ``data["cut"]``) of one cell's runs."""
    return [r for k, r in entries.items() if k.rsplit("-lr", 1)[0] == cell_key(cell)]


def state_size(cell: dict, settings: dict) -> int:
    """Numbers per sequence of the model's decode state (megatron_based.tasks.mqar.mqar_state_size's formula)."""
    d, f, T = cell["d"], cell["f"] or 0, settings["seq_len"]
    size = {"C": 2 * 2 * d, "Z": 2 * d, "H": T * d, "E": T * d, "L": (1 + f + f * (f + 1) // 2) * (d + 1),
            "A": 2 * T * d}
    return sum(size[s] for s in MODELS[cell["model"]])


def command(cell: dict, lr: float, settings: dict, json_path: Path, tf32: bool = True,
            state: Path | None = None) -> list[str]:
    s = settings
    cmd = [sys.executable, "-m", "megatron_based.tasks.mqar", "train", "--model", cell["model"],
           "--hidden-size", str(cell["d"]), "--num-heads", "1", "--lr", repr(lr),
           "--vocab-size", str(s["vocab_size"]), "--seq-len", str(s["seq_len"]),
           "--num-kv-pairs", str(s["num_kv_pairs"]), "--num-train", str(s["num_train"]),
           "--num-examples", str(s["num_test"]), "--epochs", str(s["epochs"]), "--batch-size", str(s["batch_size"]),
           "--weight-decay", str(s["weight_decay"]), "--early-stop", str(s["early_stop"]), "--json", str(json_path)]
    if cell["f"]:
        cmd += ["--feature-dim", str(cell["f"])]
    if s.get("embed_dropout"):
        cmd += ["--embed-dropout", str(s["embed_dropout"])]
    if state is not None:
        cmd += ["--state", str(state)]
    return cmd + (["--tf32"] if tf32 else [])


# ----------------------------------------------------------------------------------------------------- results
def load(path: Path) -> dict:
    return json.loads(path.read_text()) if path.exists() else {"meta": {}, "runs": {}}


def save(path: Path, data: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(data, indent=1))
    os.replace(tmp, path)


def summarize(data: dict, cells: list[dict], settings: dict) -> list[dict]:
    """One row per cell: its state size, the published recall and the best run (highest final test accuracy)."""
    rows = []
    for cell in cells:
        runs = of_cell(data["runs"], cell)
        best = max(runs, key=lambda r: r["accuracy"], default=None)
        cut = of_cell(data.get("cut", {}), cell)
        rows.append({**cell, "key": cell_key(cell), "state_size": state_size(cell, settings),
                     "published": PUBLISHED.get((cell["model"], cell["d"])), "best": best,
                     "cut": None if best else max(cut, key=lambda r: r["accuracy"], default=None),
                     "lrs_run": sorted(r["lr"] for r in runs)})
    return rows


def markdown(rows: list[dict], data: dict, settings: dict) -> str:
    s = settings
    lines = [BEGIN,
             f"*Written by `benchmarks/mqar_sweep.py` from `benchmarks/results/mqar.json`; do not edit by hand.* "
             f"Vocabulary {s['vocab_size']}, {s['seq_len']} tokens, {s['num_kv_pairs']} key-value pairs, "
             f"{s['num_train']:,} training / {s['num_test']:,} test sequences, batch {s['batch_size']}, up to "
             f"{s['epochs']} epochs (early stop > {s['early_stop']})"
             + (f", embedding dropout {s['embed_dropout']:g}" if s.get("embed_dropout") else "")
             + f", AdamW weight decay {s['weight_decay']:g}"
             + "; accuracy on the test set after the last epoch, "
             "best learning rate of the cell. State: numbers per sequence (decode caches at T "
             f"{s['seq_len']}).", ""]
    meta = data.get("meta", {})
    if any(r["best"] for r in rows):
        lines[-1:] = [f"Device: {meta.get('device', '?')}, updated {meta.get('updated', '?')}.", ""]
    lines += ["| model | d | f | state / sequence | published | ours | best lr | epochs | lrs run |",
              "|---|---|---|---:|---:|---:|---:|---:|---|"]
    for r in rows:
        b = r["best"]
        if r["model"] == "based":
            pub = "—¹"
        elif r["published"] is None:
            pub = "–"
        else:
            pub = f"{r['published']:.2f}²" if r["model"].startswith("baseconv") else f"≈ {r['published']:.1f}"
        c = r["cut"]
        if b:
            ours, lr, epochs = f"{b['accuracy']:.3f}", f"{b['lr']:g}", str(b["epochs_run"])
        elif c:
            ours, lr, epochs = f"{c['accuracy']:.3f}³", f"{c['lr']:g}", f"{c['epochs_run']} of {c['epochs']}³"
        else:
            ours, lr, epochs = "not yet run on GPU", "", ""
        lines.append(f"| {LABELS[r['model']]} ({MODELS[r['model']]}) | {r['d']} | {r['f'] or '–'} | "
                     f"{r['state_size']:,} | {pub} | {ours} | {lr} | {epochs} | "
                     f"{', '.join(f'{x:g}' for x in r['lrs_run'])} |")
    lines += ["",
              "¹ The paper plots BASED against its state size rather than tabulating it; expected: ≥ 0.9 at d 64, "
              "f 16, rising with the state size.",
              "² Zoology's BaseConv-only model (figure 2: two BaseConv layers, kernel sizes [3, -1]) has a long "
              "implicit convolution over the whole sequence in its second layer; ours is that model, ZH: Zoology's "
              "BaseConv with a short conv (Z), then with the long implicit conv (H) (same gates, skips, filter MLP "
              "and initialisation; megatron_based/model/mixers/zoology_short_conv, long_conv; equal to Zoology's "
              "code in fp64 except RMSNorm for LayerNorm, no dropout, and Zoology's 2-layer block also adding "
              "norm2 of its output to the residual: see the text above). State: Z's last 2 inputs, 2 x d, and "
              "every input of the H layer so far, T x d. BaseConv, fig. 2 runs (ZZHHZZHH): the same BaseConv-only "
              "model as Zoology's code built it when the published runs were made (4 blocks, kernel sizes "
              "[3, -1, 3, -1], each block's state mixer a second instance of its sequence mixer: 8 BaseConv "
              "mixers; see the text above the table); with explicit filters (ZZEEZZEE): the same with a free "
              "N(0, 1) filter per channel in the long layers (Zoology's implicit_long_conv=False), which that launch "
              "may have run. Zoology's own code, trained as the published launch was, gives the accuracy of ours "
              "(ZH) at T 64 and at this table's setting, below the published points (the text above)."]
    if any(r["cut"] for r in rows):
        lines.append("³ Not a result yet: the run was stopped by the sweep's time limit before it ended (no early "
                     "stop yet); the test accuracy after the epochs shown. The next call reruns it (lrs run lists "
                     "only finished runs). In the plot: squares.")
    lines.append("")
    if any(r["best"] or r["cut"] for r in rows):
        lines += ["![MQAR recall vs state size](mqar_recall_vs_state.svg)", ""]
    lines.append(END)
    return "\n".join(lines)


def write_doc(path: Path, block: str) -> None:
    """Replace the marked block of ``path`` (append it when there is none)."""
    text = path.read_text() if path.exists() else ""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(with_block(text, block, BEGIN, END))


def svg(rows: list[dict], settings: dict) -> str:
    """Recall (y) vs state size (x, log scale): a line per family (BASED: one per f), filled markers ours, hollow
    markers the published numbers."""
    W, H, L, R, T, B = 760, 460, 70, 190, 40, 55
    sizes = [r["state_size"] for r in rows]
    x0, x1 = math.floor(math.log10(min(sizes))), math.ceil(math.log10(max(sizes)))
    x1 = max(x1, x0 + 1)
    px = lambda v: L + (math.log10(v) - x0) / (x1 - x0) * (W - L - R)  # noqa: E731
    py = lambda a: H - B - a * (H - T - B)  # noqa: E731
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{H}" font-family="sans-serif" '
           f'font-size="12"><rect width="{W}" height="{H}" fill="white"/>',
           f'<text x="{L}" y="22" font-size="14">MQAR recall vs state size ({settings["seq_len"]} tokens, '
           f'{settings["num_kv_pairs"]} pairs, vocabulary {settings["vocab_size"]})</text>']
    for e in range(x0, x1 + 1):
        for m in (1, 2, 5):
            v = m * 10 ** e
            if 10 ** x0 <= v <= 10 ** x1:
                x = px(v)
                out.append(f'<line x1="{x:.1f}" y1="{T}" x2="{x:.1f}" y2="{H - B}" stroke="#ddd"/>')
                if m == 1:
                    out.append(f'<text x="{x:.1f}" y="{H - B + 16}" text-anchor="middle">1e{e}</text>')
    for i in range(6):
        y = py(i / 5)
        out.append(f'<line x1="{L}" y1="{y:.1f}" x2="{W - R}" y2="{y:.1f}" stroke="#ddd"/>')
        out.append(f'<text x="{L - 8}" y="{y + 4:.1f}" text-anchor="end">{i / 5:.1f}</text>')
    out.append(f'<rect x="{L}" y="{T}" width="{W - L - R}" height="{H - T - B}" fill="none" stroke="black"/>')
    out.append(f'<text x="{(L + W - R) / 2:.0f}" y="{H - 15}" text-anchor="middle">state per sequence (numbers, '
               'log scale)</text>')
    out.append(f'<text transform="translate(18 {(T + H - B) / 2:.0f}) rotate(-90)" text-anchor="middle">test '
               'accuracy</text>')
    series = [("attention", None, "#d62728"), ("baseconv", None, "#2ca02c"), ("baseconv-fig2", None, "#8c564b"),
              ("baseconv-fig2-explicit", None, "#7f7f7f")]
    series += [("based", f, c) for f, c in zip(sorted({r["f"] for r in rows if r["model"] == "based"}),
                                               ("#1f77b4", "#9467bd", "#17becf", "#ff7f0e"))]
    legend_y = T + 10
    for model, f, color in series:
        mine = sorted((r for r in rows if r["model"] == model and r["f"] == f), key=lambda r: r["state_size"])
        pts = [(px(r["state_size"]), py(r["best"]["accuracy"])) for r in mine if r["best"]]
        if len(pts) > 1:
            out.append(f'<polyline fill="none" stroke="{color}" stroke-width="2" points="'
                       + " ".join(f"{x:.1f},{y:.1f}" for x, y in pts) + '"/>')
        out += [f'<circle cx="{x:.1f}" cy="{y:.1f}" r="4.5" fill="{color}"/>' for x, y in pts]
        out += [f'<rect x="{px(r["state_size"]) - 4:.1f}" y="{py(r["cut"]["accuracy"]) - 4:.1f}" width="8" '
                f'height="8" fill="none" stroke="{color}" stroke-width="1.5"/>' for r in mine if r["cut"]]
        pub = [(px(r["state_size"]), py(r["published"])) for r in mine if r["published"] is not None]
        out += [f'<circle cx="{x:.1f}" cy="{y:.1f}" r="6" fill="none" stroke="{color}" stroke-width="1.5"/>'
                for x, y in pub]
        name = LABELS[model] + (f" f {f}" if f else "")
        out.append(f'<line x1="{W - R + 15}" y1="{legend_y}" x2="{W - R + 40}" y2="{legend_y}" stroke="{color}" '
                   f'stroke-width="2"/><circle cx="{W - R + 27.5}" cy="{legend_y}" r="4" fill="{color}"/>'
                   f'<text x="{W - R + 47}" y="{legend_y + 4}">{name}</text>')
        legend_y += 20
    out.append(f'<circle cx="{W - R + 27.5}" cy="{legend_y}" r="6" fill="none" stroke="black"/>'
               f'<text x="{W - R + 47}" y="{legend_y + 4}">published</text>')
    if any(r["cut"] for r in rows):
        out.append(f'<rect x="{W - R + 23.5}" y="{legend_y + 16}" width="8" height="8" fill="none" stroke="black"/>'
                   f'<text x="{W - R + 47}" y="{legend_y + 24}">cut by the time limit</text>')
    out.append("</svg>")
    return "\n".join(out) + "\n"


def report(data: dict, cells: list[dict], settings: dict, doc: Path, svg_path: Path) -> list[dict]:
    rows = summarize(data, cells, settings)
    write_doc(doc, markdown(rows, data, settings))
    if any(r["best"] or r["cut"] for r in rows):
        svg_path.parent.mkdir(parents=True, exist_ok=True)
        svg_path.write_text(svg(rows, settings))
    return rows


# ------------------------------------------------------------------------------------------------------ the sweep
EPOCH_LINE = re.compile(r"epoch (\d+)/(\d+) .*test accuracy ([0-9.]+)")


def epoch_progress(line: str) -> dict | None:
    """A run's epoch line (``megatron-based-mqar train``'s) as ``{"epochs_run", "epochs", "accuracy"}``."""
    m = EPOCH_LINE.search(line)
    return {"epochs_run": int(m[1]), "epochs": int(m[2]), "accuracy": float(m[3])} if m else None


def _pump(proc: subprocess.Popen, prefix: str, log, progress: dict) -> None:
    """Echo a run's output, one line at a time, prefixed by its key (and into its log file); its last epoch line
    goes into ``progress[prefix]``."""
    for line in proc.stdout:
        if (epoch := epoch_progress(line)) is not None:
            progress[prefix] = epoch
        if log:
            log.write(line)
            log.flush()
        if "warn" not in line.lower() and not re.match(r"[WI]\d{4} ", line):  # nor torch's glog-style notices
            print(f"[{prefix}] {line}", end="", flush=True)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--lrs", help=f"learning rates per cell, in the order they are tried [{DEFAULT_LRS}]")
    p.add_argument("--only", help="comma-separated cell keys (e.g. based-d64-f16,attention-d64) to run")
    p.add_argument("--jobs", type=int, help="runs at a time [6 per GPU, 2 without]")
    p.add_argument("--no-tf32", action="store_true", help="IEEE fp32 matmuls, as Zoology (default: TF32, "
                                                          "megatron-based-mqar train --tf32: ~3-4x less GPU time)")
    p.add_argument("--embed-dropout", type=float, default=0.0,
                   help="dropout on the token embeddings (Zoology's embed_dropout, 0.1 there; default 0: none). "
                        "A setting of the grid: a JSON holds runs of one value (use another --json)")
    p.add_argument("--batch-size", type=int, help=f"sequences per step [{FULL['batch_size']}]; a setting of the grid "
                                                  "(another --json)")
    p.add_argument("--weight-decay", type=float, help=f"AdamW's weight decay [{FULL['weight_decay']}]; a setting of "
                                                      "the grid (another --json)")
    p.add_argument("--fig2-training", action="store_true",
                   help="the training of the runs behind the published figure (Zoology as of its Oct/Nov 2023 "
                        "launches): batch 1024, AdamW's default weight decay 0.01, embedding dropout 0.1, and "
                        "learning rates 1e-4, 4.6e-4, 2.2e-3, 1e-2 unless --lrs is given")
    p.add_argument("--time-limit", type=float,
                   help="seconds: stop (unfinished runs recorded as cut) and write the outputs")
    p.add_argument("--state-dir", help="each run keeps its training state in <run>.pt here after every epoch "
                                       "(megatron-based-mqar train --state): a run cut by --time-limit continues "
                                       "from its last epoch in the next call; removed when the run is done")
    p.add_argument("--force", action="store_true", help="rerun runs already in the JSON (and start it afresh "
                                                        "when its settings differ)")
    p.add_argument("--report-only", action="store_true", help="only rewrite the table and the plot from the JSON")
    p.add_argument("--smoke", action="store_true", help="tiny sizes, 1 epoch, one width, one lr: the pipeline on CPU")
    p.add_argument("--out-dir", help="write mqar.json, mqar.md, mqar_recall_vs_state.svg and logs/ here instead")
    p.add_argument("--log-dir", help="each run's output into <run>.log here [--out-dir/logs with --out-dir]")
    p.add_argument("--json", help="results [benchmarks/results/mqar.json]")
    p.add_argument("--doc", help="markdown file whose marked block gets the table [docs/mqar.md]")
    p.add_argument("--svg", help="the plot [docs/mqar_recall_vs_state.svg]")
    args = p.parse_args(argv)

    settings = dict(SMOKE if args.smoke else FULL)
    if args.fig2_training:
        settings.update(FIG2_TRAINING)
    if args.embed_dropout:
        settings["embed_dropout"] = args.embed_dropout
    if args.batch_size is not None:
        settings["batch_size"] = args.batch_size
    if args.weight_decay is not None:
        settings["weight_decay"] = args.weight_decay
    lrs = [3e-3] if args.smoke else [float(x) for x in (args.lrs or (FIG2_LRS if args.fig2_training
                                                                     else DEFAULT_LRS)).split(",")]
    out = Path(args.out_dir) if args.out_dir else (Path(tempfile.mkdtemp(prefix="mqar-smoke-")) if args.smoke
                                                   else None)
    json_path = Path(args.json) if args.json else (out / "mqar.json" if out else REPO / "benchmarks/results/mqar.json")
    doc = Path(args.doc) if args.doc else (out / "mqar.md" if out else REPO / "docs/mqar.md")
    svg_path = Path(args.svg) if args.svg else (out / "mqar_recall_vs_state.svg" if out
                                                else REPO / "docs/mqar_recall_vs_state.svg")
    cells = grid(args.smoke)
    if args.only:
        wanted = set(args.only.split(","))
        unknown = wanted - {cell_key(c) for c in cells}
        if unknown:
            p.error(f"unknown cells {sorted(unknown)}; the grid's: {[cell_key(c) for c in cells]}")
        cells = [c for c in cells if cell_key(c) in wanted]

    data = load(json_path)
    if data["meta"].get("settings") not in (None, settings):
        if not args.force:
            p.error(f"{json_path} holds runs of other settings ({data['meta']['settings']}); --force starts afresh")
        data = {"meta": {}, "runs": {}}
    if args.report_only:
        report(data, grid(args.smoke), settings, doc, svg_path)
        print(f"wrote {doc} ({len(data['runs'])} runs)" + (f" and {svg_path}" if data["runs"] else ""))
        return 0

    import torch  # only for the device's name

    cuda = torch.cuda.is_available()
    jobs = args.jobs or (6 * torch.cuda.device_count() if cuda else 2)
    data["meta"] = {"settings": settings, "lrs": lrs, "device": torch.cuda.get_device_name() if cuda else "cpu",
                    "updated": time.strftime("%Y-%m-%d")}
    if args.force:
        data["runs"] = {k: r for k, r in data["runs"].items()
                        if k.rsplit("-lr", 1)[0] not in {cell_key(c) for c in cells}}
    data["meta"]["tf32"] = cuda and not args.no_tf32  # TF32 is a GPU matter
    queue = [(c, lr) for lr in lrs for c in cells if run_key(c, lr) not in data["runs"]]
    print(f"MQAR sweep: {len(cells)} cells x {len(lrs)} lrs, {len(queue)} runs to do, {jobs} at a time on "
          f"{data['meta']['device']}; results in {json_path}", flush=True)
    tmp = Path(tempfile.mkdtemp(prefix="mqar-runs-"))
    state_dir = Path(args.state_dir) if args.state_dir else None

    def state_of(key):  # a run's training state file (--state-dir), else None
        return state_dir / f"{key}.pt" if state_dir else None
    if state_dir:
        state_dir.mkdir(parents=True, exist_ok=True)
        for key in data["runs"]:
            state_of(key).unlink(missing_ok=True)  # carried from a call before its run finished in another
    log_dir = Path(args.log_dir) if args.log_dir else (out / "logs" if out else None)
    if log_dir:
        log_dir.mkdir(parents=True, exist_ok=True)
    # Each run is a single-process job: it picks a free port itself (a launcher's MASTER_PORT / RANK shared by
    # parallel runs would join them into one group), and with several GPUs the runs go round-robin over them.
    env = {k: v for k, v in os.environ.items() if k not in ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE",
                                                             "LOCAL_RANK", "LOCAL_WORLD_SIZE")}
    env.update(OMP_NUM_THREADS=str(max(1, (os.cpu_count() or 2) // jobs)), PYTHONWARNINGS="ignore")
    gpus = torch.cuda.device_count() if cuda else 0
    launched = 0
    t0 = time.monotonic()
    running: dict[str, tuple] = {}
    progress: dict[str, dict] = {}  # run key -> its last epoch line
    done = skipped = 0

    def converged(cell) -> bool:
        return any(r["accuracy"] > settings["early_stop"] for r in of_cell(data["runs"], cell))

    stopped, stopped_at = False, 0.0
    while queue or running:
        late = args.time_limit is not None and time.monotonic() - t0 > args.time_limit
        if late and not stopped:
            stopped, stopped_at = True, time.monotonic()
            for key, (proc, *_rest) in running.items():
                # a cut run is not a result: it goes under "cut" (the table marks it), and the next call reruns it
                now, before = progress.get(key), data.setdefault("cut", {}).get(key)
                if now and (before is None or now["epochs_run"] > before["epochs_run"]):
                    data["cut"][key] = {**now, "lr": float(key.rsplit("-lr", 1)[1])}
                print(f"time limit: stopping {key}" + (f" after epoch {now['epochs_run']} (test accuracy "
                      f"{now['accuracy']:.4f}, recorded as cut)" if now else " (nothing to record)"), flush=True)
                proc.terminate()
            queue = []
        if stopped and time.monotonic() - stopped_at > 15:
            for proc, *_rest in running.values():
                proc.kill()
        while queue and len(running) < jobs and not stopped:
            # no run that would be cut (unless it keeps its state for the next call): the call ends early instead
            if args.time_limit is not None and state_dir is None:
                left = args.time_limit - (time.monotonic() - t0)
                longest = max((r["seconds"] for r in data["runs"].values()), default=0.0) + 30  # + start-up
                if longest > 30 and left < longest:
                    print(f"time limit: {len(queue)} runs left for the next call (runs take up to ~{longest:.0f} s, "
                          f"{left:.0f} s left)", flush=True)
                    queue = []
                    break
            cell, lr = queue.pop(0)
            key = run_key(cell, lr)
            if converged(cell):
                skipped += 1
                print(f"skip {key}: a run of {cell_key(cell)} already passed {settings['early_stop']}", flush=True)
                continue
            log = open(log_dir / f"{key}.log", "w") if log_dir else None
            run_env = {**env, "CUDA_VISIBLE_DEVICES": str(launched % gpus)} if gpus > 1 else env
            launched += 1
            # (a run that continues from its state says so in its first line)
            proc = subprocess.Popen(command(cell, lr, settings, tmp / f"{key}.json", data["meta"]["tf32"],
                                            state_of(key)),
                                    cwd=REPO,
                                    env=run_env,
                                    stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
            pump = threading.Thread(target=_pump, args=(proc, key, log, progress), daemon=True)
            pump.start()
            running[key] = (proc, pump, log, time.monotonic())
        for key in list(running):
            proc, pump, log, started = running[key]
            if proc.poll() is None:
                continue
            pump.join()
            if log:
                log.close()
            del running[key]
            result_file = tmp / f"{key}.json"
            if proc.returncode == 0 and result_file.exists():
                data["runs"][key] = json.loads(result_file.read_text())
                data.get("cut", {}).pop(key, None)
                if state_dir:
                    state_of(key).unlink(missing_ok=True)
                data["meta"]["updated"] = time.strftime("%Y-%m-%d")
                save(json_path, data)
                report(data, grid(args.smoke), settings, doc, svg_path)
                done += 1
                r = data["runs"][key]
                print(f"done {key}: accuracy {r['accuracy']:.4f} after {r['epochs_run']} epochs, "
                      f"{r['seconds']:.0f} s ({done} done, {len(queue)} queued, "
                      f"{time.monotonic() - t0:.0f} s elapsed)", flush=True)
            elif not stopped:
                print(f"FAILED {key} (exit {proc.returncode}); see its output above", flush=True)
        time.sleep(0.2)
    save(json_path, data)
    rows = report(data, grid(args.smoke), settings, doc, svg_path)
    left = sum(1 for c in grid(args.smoke) for lr in lrs
               if run_key(c, lr) not in data["runs"] and not converged(c))
    print(f"wrote {json_path}, {doc}" + (f", {svg_path}" if any(r["best"] or r["cut"] for r in rows) else "")
          + f"; {done} runs done, {skipped} skipped, {left} still to run"
          + (" (run again to continue)" if left else ""))
    for r in rows:
        b, c = r["best"], r["cut"]
        ours = format(b["accuracy"], ".3f") if b else f"{c['accuracy']:.3f} (cut)" if c else "-"
        print(f"  {r['key']:22s} state {r['state_size']:>9,}  published "
              f"{'-' if r['published'] is None else r['published']:>5}  ours {ours}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
