"""Training logs: a rich progress bar (loss, lr, grad norm, tokens/s, TFLOP/s, MFU, ETA) and the same scalars to
TensorBoard and, when asked, to a JSON-lines file at full precision (scripts, tests). Model FLOPs come from
:mod:`megatron_based.model.flops` (shared with the benchmarks)."""
from __future__ import annotations

import contextlib
import json
import math
import sys
from pathlib import Path

from rich.console import Console
from rich.progress import (BarColumn, MofNCompleteColumn, Progress, ProgressColumn, TextColumn, TimeElapsedColumn,
                           TimeRemainingColumn)
from rich.table import Column
from rich.text import Text

# Dense bf16 tensor-core peaks (TFLOP/s) for the MFU estimate; others need train.peak_tflops.
PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0, "L40S": 362.0}


def peak_tflops(override: float | None) -> float | None:
    """Peak dense TFLOP/s of this device, for MFU: ``override`` or a known GPU; None on CPU."""
    if override:
        return override
    import torch

    if not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name()
    return next((v for k, v in PEAK_TFLOPS.items() if k in name), None)


class _StatsColumn(ProgressColumn):
    """The task's ``stats`` field on one line, cropped with an ellipsis to the width the other columns leave."""

    def __init__(self):
        super().__init__(table_column=Column(no_wrap=True, overflow="ellipsis", ratio=1))

    def render(self, task) -> Text:
        return Text(task.fields.get("stats", ""), no_wrap=True, overflow="ellipsis")


def progress_bar(enabled: bool = True, console: Console | None = None):
    """A rich progress bar: description, count, ETA, elapsed time and a short bar, then the stats in the width left
    (so an 80-column terminal keeps the count and ETA); a no-op context when disabled (non-logging ranks, tests)."""
    if not enabled:
        return contextlib.nullcontext(_NullProgress())
    return Progress(TextColumn("[bold]{task.description}"), MofNCompleteColumn(), TextColumn("ETA"),
                    TimeRemainingColumn(), TimeElapsedColumn(), BarColumn(bar_width=10), _StatsColumn(),
                    console=console or Console(file=sys.stdout), refresh_per_second=4, expand=True)


class _NullProgress:
    def add_task(self, *args, **kwargs):
        return 0

    def advance(self, *args, **kwargs):
        pass

    def update(self, *args, **kwargs):
        pass

    def print(self, *args, **kwargs):
        pass


class TrainLogger:
    """Per-step scalars to the progress bar and TensorBoard; validation and events as printed lines.

    Only the logging rank (``enabled``) prints and writes; the others call the same methods at no cost.
    """

    def __init__(self, *, total_steps: int, start_step: int, enabled: bool, tensorboard_dir: str | None,
                 show_progress: bool = True, metrics_file: str | None = None):
        self.enabled = enabled
        self.console = Console(file=sys.stdout)
        show_progress = show_progress and self.console.is_terminal  # piped output gets plain lines instead
        self._cm = progress_bar(enabled and show_progress, self.console)
        self.progress = self._cm.__enter__()
        self.task = self.progress.add_task("step", total=total_steps, completed=start_step, stats="")
        self.writer = None
        if enabled and tensorboard_dir:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(tensorboard_dir)
        # appended to, so a resumed run continues the file (its steps after the checkpoint repeat the lost ones)
        self.metrics = None
        if enabled and metrics_file:
            Path(metrics_file).parent.mkdir(parents=True, exist_ok=True)  # as tensorboard_dir and save are
            self.metrics = open(metrics_file, "a")
        self.show_progress = show_progress

    def step(self, step: int, scalars: dict) -> None:
        if not self.enabled:
            return
        stats = "  ".join(_fmt(k, v) for k, v in scalars.items())
        self.progress.update(self.task, completed=step, stats=stats)
        if not self.show_progress:
            print(f"step {step}  {stats}", flush=True)
        self.scalars(step, scalars, "train")

    def scalars(self, step: int, scalars: dict, prefix: str) -> None:
        if self.metrics is not None:
            self.metrics.write(json.dumps({"step": step, "split": prefix, **scalars}) + "\n")
            self.metrics.flush()
        if self.writer is not None:
            for k, v in scalars.items():
                if v is not None and math.isfinite(v):
                    self.writer.add_scalar(f"{prefix}/{k}", v, step)

    def print(self, message: str) -> None:
        if self.enabled:
            if self.show_progress:
                self.progress.print(message)
            else:
                print(message, flush=True)

    def close(self) -> None:
        self._cm.__exit__(None, None, None)
        if self.writer is not None:
            self.writer.close()
        if self.metrics is not None:
            self.metrics.close()


def _fmt(key: str, value) -> str:
    if value is None:
        return f"{key} n/a"
    if key in ("tokens/s",):
        return f"{key} {value:,.0f}"
    if key == "lr":
        return f"{key} {value:.2e}"
    if key == "MFU":
        return f"{key} {100 * value:.1f}%"
    return f"{key} {value:.4g}"
