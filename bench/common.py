"""What every side-by-side benchmark shares: model folders, the matmul peak, machine load, TRL step clock.

The scripts run as `python bench/NAME.py`, so this module imports as `common`.
"""

from __future__ import annotations

import os
import resource
import sys
import time
from pathlib import Path

import torch

THREADS = 2
SMOLLM2 = Path(__file__).resolve().parent.parent / ".cache/models/smollm2-135m-instruct"


def model_path(name: str, override: str | Path | None = None) -> Path:
    """`tiny` = the embedded default (built on first use), `smollm2` = the imported SmolLM2 folder."""
    if override:
        return Path(override)
    if name == "tiny":
        from posttrain.train.pretrain import ensure_default_model

        return ensure_default_model()
    if not (SMOLLM2 / "config.json").is_file():
        sys.exit(f"{SMOLLM2} is missing: run `bash scripts/get_smollm2.sh` once")
    return SMOLLM2


def matmul_peak(dtype: torch.dtype = torch.float32, n: int = 2048, repeats: int = 10) -> float:
    """Best GFLOP/s of a square n x n matmul on THREADS threads (after one warm-up)."""
    torch.set_num_threads(THREADS)
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    times = []
    for _ in range(repeats + 1):
        t0 = time.perf_counter()
        a @ b
        times.append(time.perf_counter() - t0)
    return 2 * n**3 / min(times[1:]) / 1e9


def busy_cpu_s() -> tuple[float, float]:
    """(CPU seconds busy on the whole machine, CPU seconds used by our finished children) so far."""
    jiffies = [int(x) for x in Path("/proc/stat").read_text().split("\n")[0].split()[1:]]
    ru = resource.getrusage(resource.RUSAGE_CHILDREN)
    return (sum(jiffies) - jiffies[3] - jiffies[4]) / os.sysconf("SC_CLK_TCK"), ru.ru_utime + ru.ru_stime


def step_clock(ends: list[float]):
    """A transformers TrainerCallback appending a timestamp at train begin and after every step."""
    from transformers import TrainerCallback

    class StepClock(TrainerCallback):
        def on_train_begin(self, args, state, control, **kw):
            ends.append(time.perf_counter())

        def on_step_end(self, args, state, control, **kw):
            ends.append(time.perf_counter())

    return StepClock()
