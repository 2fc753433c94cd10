"""Run a posttrain command in a fresh process, as a user would (the distributed tests' launcher)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path


def run_posttrain(
    command: str,
    recipe: Path,
    out: Path,
    *overrides: str,
    fault: str | None = None,
    fault_rank: int | None = None,
) -> subprocess.CompletedProcess:
    """`python -m posttrain COMMAND RECIPE output_dir=OUT ...` on one torch thread, without any
    torchrun variables of this process; ``fault`` / ``fault_rank`` set POSTTRAIN_FAULT(_RANK)
    (`posttrain.train.faults`)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    for k in ("POSTTRAIN_FAULT", "POSTTRAIN_FAULT_RANK", "RANK", "WORLD_SIZE", "LOCAL_RANK"):
        env.pop(k, None)
    env.update({"POSTTRAIN_FAULT": fault} if fault else {})
    env.update({"POSTTRAIN_FAULT_RANK": str(fault_rank)} if fault_rank is not None else {})
    cmd = [sys.executable, "-m", "posttrain", command, str(recipe), f"output_dir={out}", *overrides]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
