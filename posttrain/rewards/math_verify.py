"""Math answer equivalence: math-verify in worker processes, with a wall-clock timeout per item.

`MathVerifier.equal_batch(golds, preds)` checks each pair with the ``math-verify``
package (``parse`` both, then ``verify``; plain answers are wrapped in ``$...$``).
Its own timeouts use SIGALRM, which works only on a main thread and cannot interrupt
C code (a sympy power tower such as ``9^{9^{9^9}}`` runs for ever), so every check runs in
one of ``workers`` child processes (``python -m posttrain.rewards._math_worker``) on its
main thread, one item at a time, and the parent enforces ``timeout_s`` of wall clock
per item: a worker past its deadline is killed and replaced, the item scores False
("timeout"), and the other items go on. A pathological answer therefore costs one
timeout, never a hang. Workers start once (importing sympy takes ~1 s) and are reused.
Plain child processes rather than a ProcessPoolExecutor: an executor cannot kill one
worker without breaking the whole pool, nor time an item from when it actually starts.

Without math-verify installed, ``backend="auto"`` falls back to `simple_equal`
(numbers, fractions, ``\\frac``, sets; no symbolic algebra) with a warning, and
``backend="math_verify"`` raises `BackendUnavailable` naming the ``[math]`` extra.
"""

from __future__ import annotations

import atexit
import importlib.util
import json
import logging
import os
import re
import selectors
import subprocess
import sys
import threading
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path

from posttrain.errors import BackendUnavailable, ConfigError

PACKAGE_PARENT = Path(__file__).resolve().parents[2]
MISSING_FIX = "pip install 'posttrain[math]' (or pip install math-verify)"
log = logging.getLogger(__name__)
_default_lock = threading.Lock()
_default: MathVerifier | None = None
_warned: list[bool] = []


def math_verify_installed() -> bool:
    """Whether the ``math-verify`` package can be imported."""
    return importlib.util.find_spec("math_verify") is not None


def _normalize(answer: str) -> str:
    """LaTeX-light canonical text: no ``$``, spaces, ``\\left``/``\\right``; ``\\frac{a}{b}`` -> ``(a)/(b)``."""
    text = answer.strip().strip("$")
    for token in ("\\left", "\\right", "\\!", "\\,", "\\;", " "):
        text = text.replace(token, "")
    text = re.sub(r"\\[dt]?frac\{([^{}]*)\}\{([^{}]*)\}", r"(\1)/(\2)", text)
    text = re.sub(r"\\[dt]?frac(\d)(\d)", r"\1/\2", text)
    return text.replace("\\{", "{").replace("\\}", "}").removesuffix(".")


def _canonical(element: str) -> object:
    """A number as an exact Fraction when it parses as one, else the text."""
    try:
        return Fraction(element.replace("(", "").replace(")", ""))
    except (ValueError, ZeroDivisionError):
        return element


def simple_equal(gold: str, pred: str) -> bool:
    """Equivalence without math-verify: exact numbers (``0.5 == 1/2 == \\frac{1}{2}``), and
    comma-separated collections compared as sets (``{1, -2}`` vs ``-2, 1``); else text equality."""
    g, p = _normalize(gold), _normalize(pred)
    if g == p:
        return True
    if "," in g or "," in p:
        items = [{_canonical(x) for x in s.strip("{}[]()").split(",") if x} for s in (g, p)]
        return items[0] == items[1]
    return _canonical(g) == _canonical(p)


@dataclass
class _Worker:
    proc: subprocess.Popen
    started: float
    buf: bytearray = field(default_factory=bytearray)
    ready: bool = False
    item: int | None = None
    deadline: float = 0.0


class MathVerifier:
    """A small pool of math-verify worker processes with a per-item wall-clock timeout."""

    def __init__(self, timeout_s: float = 5.0, workers: int = 2, startup_timeout_s: float = 120.0):
        if timeout_s <= 0 or workers < 1:
            raise ConfigError("math verifier needs timeout_s > 0 and workers >= 1", where="timeout_s/workers")
        if not math_verify_installed():
            raise BackendUnavailable("math-verify is not installed", where="rewards.math", fix=MISSING_FIX)
        self.timeout_s = timeout_s
        self.startup_timeout_s = startup_timeout_s
        self.n_workers = workers
        self._workers: list[_Worker] = []
        self._sel = selectors.DefaultSelector()
        self._lock = threading.Lock()

    def _start(self) -> _Worker:
        proc = subprocess.Popen(
            [sys.executable, "-m", "posttrain.rewards._math_worker"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            cwd=PACKAGE_PARENT,
        )
        worker = _Worker(proc, time.monotonic())
        self._sel.register(proc.stdout, selectors.EVENT_READ, worker)
        return worker

    def _retire(self, worker: _Worker) -> None:
        """Kill a worker (stuck or dead) and start its replacement."""
        self._sel.unregister(worker.proc.stdout)
        worker.proc.kill()
        worker.proc.wait()
        for stream in (worker.proc.stdin, worker.proc.stdout):
            stream.close()
        self._workers[self._workers.index(worker)] = self._start()

    def _dispatch(self, queue: deque, golds: Sequence[str], preds: Sequence[str | None]) -> None:
        for worker in self._workers:
            if worker.ready and worker.item is None and queue:
                i = queue.popleft()
                line = json.dumps({"i": i, "gold": golds[i], "pred": preds[i], "timeout_s": self.timeout_s})
                worker.proc.stdin.write(line.encode() + b"\n")
                worker.proc.stdin.flush()
                worker.item, worker.deadline = i, time.monotonic() + self.timeout_s

    def _on_line(self, worker: _Worker, line: bytes, results: list) -> None:
        msg = json.loads(line)
        if "import_error" in msg:
            raise BackendUnavailable(f"math-verify failed to import: {msg['import_error']}", fix=MISSING_FIX)
        if msg.get("ready"):
            worker.ready = True
        elif msg.get("i") == worker.item:
            results[worker.item] = (
                bool(msg["ok"]),
                msg["error"] or ("equivalent" if msg["ok"] else "not equivalent"),
            )
            worker.item = None

    def _read(self, worker: _Worker, results: list) -> None:
        """Consume a worker's output; a worker that died is retired (its item fails)."""
        chunk = os.read(worker.proc.stdout.fileno(), 1 << 16)
        if not chunk:
            if worker.item is not None:
                results[worker.item] = (False, "math-verify worker died")
            self._retire(worker)
            return
        worker.buf += chunk
        while b"\n" in worker.buf:
            line, _, rest = bytes(worker.buf).partition(b"\n")
            worker.buf = bytearray(rest)
            self._on_line(worker, line, results)

    def _expire(self, results: list) -> None:
        now = time.monotonic()
        for worker in list(self._workers):
            if worker.item is not None and now >= worker.deadline:
                results[worker.item] = (False, f"timeout after {self.timeout_s:g} s")
                self._retire(worker)
            elif not worker.ready and now - worker.started > self.startup_timeout_s:
                raise BackendUnavailable(f"math-verify workers did not start in {self.startup_timeout_s:g} s")

    def equal_batch(self, golds: Sequence[str], preds: Sequence[str | None]) -> list[tuple[bool, str]]:
        """``(equivalent, why)`` per pair; a None prediction is ``(False, "no answer")``."""
        if len(golds) != len(preds):
            raise ConfigError(f"{len(golds)} gold answers for {len(preds)} predictions", where="equal_batch")
        results: list = [(False, "no answer")] * len(golds)
        queue = deque(i for i, p in enumerate(preds) if p is not None and str(p).strip())
        with self._lock:
            while len(self._workers) < min(self.n_workers, max(1, len(queue))):
                self._workers.append(self._start())
            while queue or any(w.item is not None for w in self._workers):
                self._dispatch(queue, golds, preds)
                waits = [w.deadline for w in self._workers if w.item is not None]
                waits += [w.started + self.startup_timeout_s for w in self._workers if not w.ready]
                left = max(0.0, min(waits) - time.monotonic()) if waits else None
                for key, _ in self._sel.select(left):
                    self._read(key.data, results)
                self._expire(results)
        return results

    def close(self) -> None:
        """Stop every worker."""
        with self._lock:
            for worker in self._workers:
                self._sel.unregister(worker.proc.stdout)
                worker.proc.kill()
                worker.proc.wait()
                worker.proc.stdin.close()
                worker.proc.stdout.close()
            self._workers = []

    def __enter__(self) -> MathVerifier:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def default_verifier() -> MathVerifier:
    """The process-wide verifier used by the ``math`` reward (started lazily, closed at exit)."""
    global _default
    with _default_lock:
        if _default is None:
            _default = MathVerifier()
            atexit.register(_default.close)
        return _default


def math_equal_batch(
    golds: Sequence[str], preds: Sequence[str | None], backend: str = "auto"
) -> list[tuple[bool, str]]:
    """Equivalence of each (gold, pred) pair by ``backend``: ``math_verify``, ``simple`` or ``auto``."""
    if backend not in ("auto", "math_verify", "simple"):
        raise ConfigError(
            f"unknown math backend {backend!r}", where="backend", fix="auto, math_verify or simple"
        )
    if backend == "simple" or (backend == "auto" and not math_verify_installed()):
        if backend == "auto" and not _warned:
            _warned.append(True)
            log.warning("math-verify is not installed; using the simple numeric comparison (%s)", MISSING_FIX)
        return [
            (False, "no answer") if p is None else (simple_equal(g, p), "simple")
            for g, p in zip(golds, preds, strict=True)
        ]
    return default_verifier().equal_batch(golds, preds)
