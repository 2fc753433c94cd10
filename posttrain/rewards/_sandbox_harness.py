"""The test harness that runs inside the sandbox (process D), standard library only.

Assert tests (``kind == "assert"``): the program is executed with ``__name__ ==
"solution"`` (so an ``if __name__ == "__main__":`` block does not run), then the test
setup, then each test snippet in the same namespace; a snippet passes when it raises
nothing. With an ``entry_point`` the function is also bound to ``candidate``.

Stdin/stdout tests (``kind == "io"``): for each case the program runs as
``python -I -S -B solution.py`` in a new session with the case input on stdin; it passes
when its stdout equals the expected output after normalisation (CRLF -> LF, trailing
spaces of each line and trailing empty lines dropped).

Every test result is one JSON line on the report fd, then an ``end`` line with the
verdict. The reason of a failed run is that of its first failing test (see `classify`).
Lines come only from the harness process: a child the program forks that falls back into
the harness exits at once. Not tamper-proof: an assert-mode program shares the harness's
process and can forge its report; the sandbox protects the host, not the reward.
"""

from __future__ import annotations

import builtins
import contextlib
import errno
import os
import signal
import sys
import time
from collections.abc import Callable

FORBIDDEN_ERRNOS = frozenset(
    {
        errno.EPERM,
        errno.EACCES,
        errno.EROFS,
        errno.ENETUNREACH,
        errno.ENETDOWN,
        errno.EHOSTUNREACH,
        errno.EADDRNOTAVAIL,
        errno.ESRCH,
        errno.EAGAIN,
    }
)
DETAIL_CHARS = 300
ESCAPES = {'"': '\\"', "\\": "\\\\"}


def json_line(obj: dict) -> bytes:
    """One JSON object line from str/int/bool values (no json import: launcher startup time)."""

    def enc(v: object) -> str:
        if isinstance(v, bool):
            return "true" if v else "false"
        if isinstance(v, int):
            return str(v)
        return '"' + "".join(ESCAPES.get(c) or (c if c >= " " else f"\\u{ord(c):04x}") for c in str(v)) + '"'

    text = "{" + ", ".join(f"{enc(k)}: {enc(v)}" for k, v in obj.items()) + "}\n"
    return text.encode("utf-8", "replace")


def read_capped(
    fds: dict[str, int], deadline: float | Callable[[dict[str, bytearray]], float], caps: dict[str, int]
) -> tuple[dict[str, bytes], str]:
    """Read the pipes ``fds`` until all reach EOF, the deadline (monotonic; or a function of
    the bytes read so far) passes, or a pipe sent more than its ``caps`` bytes. Returns the
    bytes read (at most cap + 1 per pipe) and how it stopped: ``eof``, ``timeout``, ``overflow``.
    """
    import selectors  # lazily: the launcher's startup time

    bufs = {name: bytearray() for name in fds}
    with selectors.DefaultSelector() as sel:
        for name, fd in fds.items():
            sel.register(fd, selectors.EVENT_READ, name)
        while sel.get_map():
            left = (deadline(bufs) if callable(deadline) else deadline) - time.monotonic()
            if left <= 0:
                return {k: bytes(v) for k, v in bufs.items()}, "timeout"
            for key, _ in sel.select(left):
                chunk = os.read(key.fd, 1 << 16)
                if not chunk:
                    sel.unregister(key.fd)
                    continue
                buf, cap = bufs[key.data], caps[key.data]
                buf += chunk[: cap + 1 - len(buf)]
                if len(buf) > cap:
                    return {k: bytes(v) for k, v in bufs.items()}, "overflow"
    return {k: bytes(v) for k, v in bufs.items()}, "eof"


def kill_group(pgid: int) -> None:
    """SIGKILL a process group; a group that is already gone is fine."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, signal.SIGKILL)


def normalize_output(text: str) -> list[str]:
    """Output lines without CR, trailing spaces, or trailing empty lines."""
    lines = [line.rstrip() for line in text.replace("\r\n", "\n").split("\n")]
    while lines and not lines[-1]:
        lines.pop()
    return lines


def classify(exc: BaseException, writable: tuple[str, ...]) -> str:
    """The failure reason for an exception the program raised.

    AssertionError -> wrong_answer; MemoryError -> memory; an OSError the sandbox causes
    (permission, read-only filesystem, no network, no such process, a resource limit,
    or a missing absolute path outside the working directory: a hidden host file) ->
    forbidden; anything else (RecursionError, SystemExit, ...) -> crash.
    """
    if isinstance(exc, AssertionError):
        return "wrong_answer"
    if isinstance(exc, MemoryError):
        return "memory"
    if isinstance(exc, OSError):
        if exc.errno in FORBIDDEN_ERRNOS:
            return "forbidden"
        name = exc.filename if isinstance(exc.filename, str) else ""
        if isinstance(exc, FileNotFoundError) and name.startswith("/") and not name.startswith(writable):
            return "forbidden"
    return "crash"


def describe(exc: BaseException) -> str:
    """``Type: message``, shortened; never raises."""
    try:
        text = f"{type(exc).__name__}: {exc}"
    except BaseException:  # a hostile __str__
        text = type(exc).__name__
    return text[:DETAIL_CHARS]


class Reporter:
    """Writes JSON lines to the report fd, only from the process that created it."""

    def __init__(self, fd: int):
        self.fd = fd
        self.pid = os.getpid()

    def guard(self) -> None:
        """Exit a forked child of the program that returned into harness code."""
        if os.getpid() != self.pid:
            os._exit(0)

    def send(self, **obj: object) -> None:
        self.guard()
        with contextlib.suppress(OSError):
            os.write(self.fd, json_line(obj))


def _attempt(code: object, ns: dict, report: Reporter, writable: tuple[str, ...]) -> tuple[str, str] | None:
    """exec ``code`` in ``ns``: None when it raised nothing, else (reason, detail)."""
    try:
        exec(code, ns)
    except BaseException as exc:  # the program may raise anything, SystemExit included
        report.guard()
        return classify(exc, writable), describe(exc)
    report.guard()
    return None


def run_asserts(code: object, job: dict, report: Reporter) -> tuple[int, str, str]:
    """Run the program, the setup and each assert snippet; (passed, reason, detail)."""
    writable = (os.getcwd(),)
    ns: dict = {"__name__": "solution", "__builtins__": builtins}
    err = _attempt(code, ns, report, writable)
    if err is not None:
        return 0, err[0], f"the program failed: {err[1]}"
    if job["setup"]:
        err = _attempt(compile(job["setup"], "tests.py", "exec"), ns, report, writable)
        if err is not None:
            return 0, err[0], f"test setup failed: {err[1]}"
    entry = job.get("entry_point")
    if entry:
        if entry not in ns:
            return 0, "crash", f"entry point {entry!r} is not defined"
        ns["candidate"] = ns[entry]
    passed, first = 0, None
    for i, case in enumerate(job["cases"]):
        err = _attempt(compile(case, f"test_{i}.py", "exec"), ns, report, writable)
        report.send(event="test", i=i, ok=err is None)
        if err is None:
            passed += 1
        elif first is None:
            first = (err[0], f"test {i} ({case.strip()[:80]}): {err[1]}")
    return passed, *(first or ("ok", ""))


def _case_verdict(code: int, out: str, err: str, expected: str) -> tuple[str, str]:
    """(reason, detail) of one finished stdin/stdout case."""
    if code != 0:
        last = (err.strip().splitlines() or [""])[-1][:DETAIL_CHARS]
        if code == -signal.SIGXCPU:
            return "timeout", "CPU time limit"
        if last.startswith("MemoryError"):
            return "memory", last
        forbidden = last.startswith("PermissionError") or any(
            f"[Errno {e}]" in last for e in FORBIDDEN_ERRNOS
        )
        return ("forbidden" if forbidden else "crash"), last or f"exit status {code}"
    if normalize_output(out) == normalize_output(expected):
        return "ok", ""
    return "wrong_answer", f"expected {expected[:100]!r}, got {out[:100]!r}"


def run_case(job: dict, case: dict, deadline: float) -> tuple[str, str]:
    """Run the program on one stdin/stdout case; (reason, detail)."""
    import subprocess

    with open(".stdin", "w", encoding="utf-8") as f:
        f.write(case["input"])
    with open(".stdin", "rb") as fin:
        os.unlink(".stdin")
        proc = subprocess.Popen(
            [job["python"], "-I", "-S", "-B", "solution.py"],
            stdin=fin,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=job["env"],
            start_new_session=True,
        )
    cap = job["max_output_bytes"]
    bufs, how = read_capped(
        {"out": proc.stdout.fileno(), "err": proc.stderr.fileno()}, deadline, {"out": cap, "err": cap}
    )
    if how == "eof":
        try:
            proc.wait(timeout=max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            how = "timeout"
    kill_group(proc.pid)
    code = proc.wait()
    proc.stdout.close()
    proc.stderr.close()
    if how == "timeout":
        return "timeout", "wall-clock time limit"
    if how == "overflow":
        return "forbidden", f"output over {job['max_output_bytes']} bytes"
    out, err = (bufs[k].decode("utf-8", "replace") for k in ("out", "err"))
    return _case_verdict(code, out, err, case["output"])


def run_io(job: dict, report: Reporter) -> tuple[int, str, str]:
    """Run every stdin/stdout case; stops at the first timeout (no time is left)."""
    deadline = time.monotonic() + job["timeout_s"]
    passed, first = 0, None
    for i, case in enumerate(job["cases"]):
        reason, detail = run_case(job, case, deadline)
        report.send(event="test", i=i, ok=reason == "ok")
        if reason == "ok":
            passed += 1
        elif first is None:
            first = (reason, f"case {i}: {detail}")
        if reason == "timeout":
            break
    return passed, *(first or ("ok", ""))


def run(job: dict, report_fd: int) -> int:
    """Compile the program, run its tests, send the ``end`` line; the exit status (0)."""
    report = Reporter(report_fd)
    total = len(job["cases"])
    report.send(event="start", total=total)
    try:
        code = compile(job["code"], "solution.py", "exec")
    except (SyntaxError, ValueError) as exc:
        report.send(event="end", passed=0, total=total, reason="syntax_error", detail=describe(exc))
        return 0
    run_tests = run_io if job["kind"] == "io" else lambda j, r: run_asserts(code, j, r)
    passed, reason, detail = run_tests(job, report)
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(BaseException):  # the program may have closed or replaced it
            stream.flush()
    report.send(event="end", passed=passed, total=total, reason=reason, detail=detail)
    return 0
