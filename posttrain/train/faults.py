"""Fault injection for crash-safety tests.

`POSTTRAIN_FAULT=<point>:<step>` makes the process SIGKILL itself at a named
point, so tests can check that a real kill (no cleanup, no exception handlers)
leaves checkpoints loadable and that resume is exact. Points:
- `after-step:N`: right after optimiser step N (before any checkpoint of step N);
- `mid-save:N`: while writing checkpoint N, after its files, before the rename.
- `mid-export:N`: while staging export N (`posttrain export`), before the rename into OUT.
- `hang-<point>:N`: sleep forever there instead (a stuck rank, for the collective timeout).
`POSTTRAIN_FAULT_RANK=r` limits the fault to distributed rank r (default: every rank).
Unset in normal use; reading one environment variable is the whole cost.

`StopRequest` turns SIGINT / SIGTERM during training into a clean stop: the current step
finishes, a checkpoint is saved, and the command exits with status 130 (SIGINT) or 143 (SIGTERM).
"""

from __future__ import annotations

import os
import signal
import sys
import threading
import time

from posttrain.errors import PosttrainError


def maybe_kill(point: str, step: int) -> None:
    fault, rank = os.environ.get("POSTTRAIN_FAULT"), os.environ.get("RANK", "0")
    if fault is None or os.environ.get("POSTTRAIN_FAULT_RANK", rank) != rank:
        return
    if fault == f"{point}:{step}":
        os.kill(os.getpid(), signal.SIGKILL)
    if fault == f"hang-{point}:{step}":  # a stuck rank: the others must time out, not wait forever
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        while True:
            time.sleep(60)


class RunInterrupted(PosttrainError):
    """SIGINT or SIGTERM stopped a run after a checkpoint was saved; exits 130 (SIGINT) or 143 (SIGTERM)."""

    def __init__(self, signum: int, step: int, checkpoint: str):
        name = signal.Signals(signum).name
        super().__init__(
            f"interrupted by {name} after step {step}; checkpoint saved to {checkpoint}",
            fix="rerun the same command to resume from it",
        )
        self.exit_code = 128 + signum


class StopRequest:
    """While active, the first SIGINT (Ctrl-C) or SIGTERM only sets `signum`: the loop finishes
    its step, saves a checkpoint and raises RunInterrupted. A second SIGINT stops at once
    (KeyboardInterrupt; the last complete checkpoint stays intact). Outside the main thread,
    where handlers cannot be installed, it does nothing."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self._old: dict[int, object] = {}

    def _handle(self, signum: int, frame) -> None:
        if self.signum is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.signum = signum
        print(f"\n{signal.Signals(signum).name}: stopping after this step with a checkpoint "
              "(Ctrl-C again stops at once)", file=sys.stderr, flush=True)  # fmt: skip

    def __enter__(self) -> StopRequest:
        if threading.current_thread() is threading.main_thread():
            for s in (signal.SIGINT, signal.SIGTERM):
                self._old[s] = signal.signal(s, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for s, old in self._old.items():
            signal.signal(s, old)
        self._old = {}
