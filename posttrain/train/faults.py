"""Fault injection for crash-safety tests.

`POSTTRAIN_FAULT=<point>:<step>` makes the process SIGKILL itself at a named
point, so tests can check that a real kill (no cleanup, no exception handlers)
leaves checkpoints loadable and that resume is exact. Points:
- `after-step:N`: right after optimiser step N (before any checkpoint of step N);
- `mid-save:N`: while writing checkpoint N, after its files, before the rename.
- `mid-export:N`: while staging export N (`posttrain export`), before the rename into OUT.
Unset in normal use; reading one environment variable is the whole cost.
"""

from __future__ import annotations

import os
import signal


def maybe_kill(point: str, step: int) -> None:
    if os.environ.get("POSTTRAIN_FAULT") == f"{point}:{step}":
        os.kill(os.getpid(), signal.SIGKILL)
