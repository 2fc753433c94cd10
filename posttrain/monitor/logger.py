"""Run logging: metrics.jsonl, tracker backends (TensorBoard, MLflow, W&B, trackio), a live
progress bar, anomaly checks and events, and report.html when a run closes."""

from __future__ import annotations

import json
import math
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from posttrain.errors import PosttrainError, TrainingAnomaly

console = Console(stderr=True)


class RunLogger:
    """Appends one JSON line per log call to RUN_DIR/metrics.jsonl and mirrors scalars to the
    tracker backends named in `loggers` (see posttrain.monitor.loggers).

    The JSONL file is opened in append mode and flushed per line, so a killed
    run keeps every line it logged; on resume, lines from steps after the
    checkpoint are dropped first so the file never holds a step twice.
    `loggers=None` keeps the older switch: TensorBoard when `tensorboard` is true.
    """

    def __init__(
        self,
        run_dir: str | Path,
        tensorboard: bool = True,
        resume_step: int | None = None,
        loggers: Sequence[str] | None = None,
        config: dict | None = None,
    ):
        from posttrain.monitor.loggers import open_backends

        self.run_dir = Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.path = self.run_dir / "metrics.jsonl"
        if resume_step is not None:
            self._truncate_after(resume_step)
        if loggers is None:
            loggers = ["tensorboard"] if tensorboard else []
        self._backends = open_backends(loggers, self.run_dir, config)
        self._file = open(self.path, "a", encoding="utf-8")  # noqa: SIM115 - lives as long as the run

    def _truncate_after(self, step: int) -> None:
        if not self.path.exists():
            return
        lines = self.path.read_text(encoding="utf-8", errors="replace").splitlines()
        kept = [ln for ln in lines if (s := _step_of(ln)) is not None and s <= step]
        tmp = self.path.with_suffix(".jsonl.tmp")
        tmp.write_text("".join(ln + "\n" for ln in kept))
        tmp.replace(self.path)

    def log(self, step: int, metrics: dict[str, Any], prefix: str = "") -> None:
        row = {"step": step, "time": round(time.time(), 3)}
        row.update({f"{prefix}{k}": v for k, v in metrics.items()})
        self._file.write(json.dumps(row, default=float) + "\n")
        self._file.flush()
        scalars = {
            f"{prefix}{k}": float(v)
            for k, v in metrics.items()
            if isinstance(v, int | float) and not isinstance(v, bool)
        }
        for backend in self._backends:
            backend.log(step, scalars)

    def rewind(self, step: int) -> None:
        """Drop the lines of steps after ``step`` (a rollback to that step's checkpoint)."""
        self._file.close()
        self._truncate_after(step)
        self._file = open(self.path, "a", encoding="utf-8")  # noqa: SIM115 - lives as long as the run

    def event(self, step: int, event: str, **fields: Any) -> None:
        """Append an event line (no metric values), e.g. an anomaly: `event(37, "anomaly",
        detector="kl_limit", metric="kl/token_mean", value=0.81, threshold=0.5, action="pause",
        message=...)`; the record format is documented in posttrain.monitor.html_report."""
        row = {"step": step, "time": round(time.time(), 3), "event": event, **fields}
        self._file.write(json.dumps(row, default=str) + "\n")
        self._file.flush()

    def close(self, report: bool = True) -> None:
        """Close the file and the backends; then (re)write RUN_DIR/report.html from the run's files."""
        if self._file.closed:
            return
        self._file.close()
        for backend in self._backends:
            backend.close()
        if report:
            write_report(self.run_dir)


def write_report(run_dir: Path) -> Path | None:
    """RUN_DIR/report.html; a failure to write it (disk full, permissions) is a warning, not an
    error, since the run's results are already saved."""
    from posttrain.monitor.html_report import run_html

    try:
        return run_html([run_dir])
    except (OSError, PosttrainError) as exc:
        console.print(f"[yellow]warning[/yellow]: could not write {run_dir / 'report.html'}: {exc}")
        return None


def _step_of(line: str) -> int | None:
    """The step of a metrics line; None for a blank or torn line (a run killed mid-write)."""
    try:
        row = json.loads(line)
    except json.JSONDecodeError:
        return None
    return row.get("step", 0) if isinstance(row, dict) else None


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
