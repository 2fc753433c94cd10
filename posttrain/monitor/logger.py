"""Run logging: metrics.jsonl, TensorBoard events, a live progress bar, anomaly checks."""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from posttrain.errors import TrainingAnomaly

console = Console(stderr=True)


class RunLogger:
    """Appends one JSON line per log call to RUN_DIR/metrics.jsonl and mirrors scalars to TensorBoard.

    The JSONL file is opened in append mode and flushed per line, so a killed
    run keeps every line it logged; on resume, lines from steps after the
    checkpoint are dropped first so the file never holds a step twice.
    """

    def __init__(self, run_dir: str | Path, tensorboard: bool = True, resume_step: int | None = None):
        self.run_dir = Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.path = self.run_dir / "metrics.jsonl"
        if resume_step is not None:
            self._truncate_after(resume_step)
        self._file = open(self.path, "a")  # noqa: SIM115 - lives as long as the run
        self._tb = None
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(str(self.run_dir / "tb"))

    def _truncate_after(self, step: int) -> None:
        if not self.path.exists():
            return
        kept = [
            ln
            for ln in self.path.read_text().splitlines()
            if ln.strip() and json.loads(ln).get("step", 0) <= step
        ]
        tmp = self.path.with_suffix(".jsonl.tmp")
        tmp.write_text("".join(ln + "\n" for ln in kept))
        tmp.replace(self.path)

    def log(self, step: int, metrics: dict[str, Any], prefix: str = "") -> None:
        row = {"step": step, "time": round(time.time(), 3)}
        row.update({f"{prefix}{k}": v for k, v in metrics.items()})
        self._file.write(json.dumps(row, default=float) + "\n")
        self._file.flush()
        if self._tb is not None:
            for k, v in metrics.items():
                if isinstance(v, int | float) and not isinstance(v, bool):
                    self._tb.add_scalar(f"{prefix}{k}", v, step)

    def close(self) -> None:
        self._file.close()
        if self._tb is not None:
            self._tb.close()


def read_metrics(run_dir: str | Path) -> list[dict[str, Any]]:
    path = Path(run_dir) / "metrics.jsonl"
    if not path.exists():
        return []
    return [json.loads(ln) for ln in path.read_text().splitlines() if ln.strip()]


def check_finite(value: float, name: str, step: int) -> None:
    """Raise TrainingAnomaly if a loss/grad-norm is NaN or infinite."""
    if not math.isfinite(value):
        raise TrainingAnomaly(
            f"{name} is {value} at step {step}; training stopped before the optimiser step, so the weights are "
            "unchanged",
            fix="lower the learning rate, check the data for empty or broken samples, or use fp32 precision; "
            "resume from the last checkpoint",
        )


def progress_bar(total: int, description: str = "train", disable: bool = False) -> Progress:
    """A rich progress bar with step count, free-form stats (loss, tok/s) and ETA."""
    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        TextColumn("{task.completed}/{task.total}"),
        TextColumn("{task.fields[stats]}"),
        TimeElapsedColumn(),
        TextColumn("eta"),
        TimeRemainingColumn(),
        console=console,
        disable=disable,
        transient=False,
    )
