"""What each optimizer checkpoint format costs: save and load time, peak host and GPU memory added by the save /
load, and bytes on disk, for a model trained with Megatron's distributed optimizer (bf16, DDP), one format per fresh
process so the memory peaks do not mix.

    python benchmarks/checkpoint_formats.py --config configs/based-1.3b.yaml --out benchmarks/results/checkpoint_formats.json

``fully_reshardable`` gathers the Adam state (fp32 main params, both moments: 12 bytes per parameter) of every
data-parallel rank into host memory in model shape on each rank; ``dp_reshardable`` writes each rank's flat shard
as is. Runs on one GPU (data-parallel size 1) or under torchrun; on CPU with ``--smoke`` (tiny model).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
FORMATS = ("fully_reshardable", "dp_reshardable")


def host_peak_gib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 2**20
    return float("nan")


def reset_host_peak() -> None:
    """Lower the peak resident set (VmHWM) to the current one (Linux: write 5 to clear_refs)."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass


def one_format(args) -> dict:
    import torch
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig

    from megatron_based.training import checkpointing
    from megatron_based.model import build_model
    from megatron_based.runtime.parallel import initialize_parallel
    from megatron_based.training.optimizer import build_optimizer
    from megatron_based.training.config import DataConfig, ParallelConfig, RunConfig, TrainConfig

    cuda = torch.cuda.is_available()
    from megatron_based.model.config import read_model_section

    model_section = {**read_model_section(args.config), "seq_length": args.seq}
    cfg = RunConfig(model=model_section, parallel=ParallelConfig(), data=DataConfig(),
                    train=TrainConfig(micro_batch_size=1, global_batch_size=1, lr_warmup_steps=0, train_steps=10),
                    world_size=int(os.environ.get("WORLD_SIZE", 1)))
    spec = cfg.model_spec()
    initialize_parallel(1, 1, 1, seed=1)
    device = torch.device("cuda" if cuda else "cpu")
    model = build_model(spec.config, vocab_size=spec.vocab_size, max_sequence_length=spec.seq_length,
                        make_vocab_size_divisible_by=spec.make_vocab_size_divisible_by).to(device)
    model = DistributedDataParallel(spec.config, DistributedDataParallelConfig(
        grad_reduce_in_fp32=True, use_distributed_optimizer=True), model)
    optimizer, scheduler = build_optimizer(cfg, model, spec.config)
    tokens = torch.randint(0, spec.vocab_size, (1, args.seq), device=device)
    pos = torch.arange(args.seq, device=device)[None]
    model.zero_grad_buffer()
    model(tokens, pos, attention_mask=None, labels=tokens).float().mean().backward()
    model.finish_grad_sync()
    optimizer.step()  # the Adam state exists from here on
    params = sum(p.numel() for p in model.parameters())

    root = Path(args.dir)
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    row = {"format": args.format, "parameters": params, "device": torch.cuda.get_device_name() if cuda else "cpu"}
    for phase in ("save", "load"):
        sync()
        if cuda:
            torch.cuda.reset_peak_memory_stats()
            gpu_before = torch.cuda.memory_allocated()
        reset_host_peak()
        host_before = host_peak_gib()
        t = time.perf_counter()
        if phase == "save":
            path = checkpointing.save_checkpoint(root, 1, model, optimizer, scheduler, {"step": 1}, cfg.to_dict(),
                                                 optimizer_format=args.format)
        else:
            checkpointing.load_checkpoint(path, model, optimizer, scheduler)
        sync()
        row[f"{phase}_s"] = round(time.perf_counter() - t, 2)
        row[f"{phase}_host_peak_gib"] = round(host_peak_gib() - host_before, 2)
        if cuda:
            row[f"{phase}_gpu_peak_gib"] = round((torch.cuda.max_memory_allocated() - gpu_before) / 2**30, 2)
    row["disk_gib"] = round(sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) / 2**30, 2)
    return row


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", default=str(REPO / "configs" / "based-1.3b.yaml"))
    ap.add_argument("--seq", type=int, default=2048)
    ap.add_argument("--out", help="JSON file for the rows")
    ap.add_argument("--smoke", action="store_true", help="tiny model on CPU")
    ap.add_argument("--formats", nargs="+", choices=FORMATS, default=list(FORMATS))
    ap.add_argument("--format", choices=FORMATS, help=argparse.SUPPRESS)  # one case, in a child process
    ap.add_argument("--dir", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.format:
        print("ROW " + json.dumps(one_format(args)), flush=True)
        return 0
    if args.smoke:
        args.config, args.seq = str(REPO / "configs" / "tiny.yaml"), 64
    rows = []
    for fmt in args.formats:
        tmp = tempfile.mkdtemp(prefix="ckpt_formats_")
        try:
            out = subprocess.run([sys.executable, __file__, "--config", args.config, "--seq", str(args.seq),
                                  "--format", fmt, "--dir", tmp], capture_output=True, text=True)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        lines = [line[4:] for line in out.stdout.splitlines() if line.startswith("ROW ")]
        if out.returncode or not lines:
            print(f"{fmt}: failed (exit {out.returncode})\n{out.stderr[-3000:]}", file=sys.stderr)
            return 1
        rows.append(json.loads(lines[0]))
        print(json.dumps(rows[-1]), flush=True)
    if args.out:  # rows of formats not run this time are kept from the file
        import torch

        meta = {"config": Path(args.config).name, "seq": args.seq, "torch": torch.__version__,
                "date": time.strftime("%Y-%m-%d")}
        out = Path(args.out)
        kept = json.loads(out.read_text())["rows"] if out.is_file() else []
        rows = [r for r in kept if r["format"] not in args.formats] + rows
        out.write_text(json.dumps({"meta": meta, "rows": rows}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
