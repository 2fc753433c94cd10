"""Run untrusted Python programs against tests in a local sandbox.

A `Program` is code plus tests: assert snippets or stdin/stdout cases (formats in
`posttrain.rewards.code_tests`). `run_program` returns a `SandboxResult` (passed, total,
reason, detail); `run_programs` runs a batch on a small thread pool, each thread driving
one launcher subprocess (``_sandbox_launch.py``; the harness is ``_sandbox_harness.py``,
whose docstring tells how tests run and how a failure's reason is chosen). The program
runs on the caller's interpreter with ``-I -S``: the standard library only.

What the sandbox contains (``isolation="namespaces"``, the default):

- Files: a new mount namespace whose root is a fresh read-only tmpfs holding read-only,
  nosuid, nodev binds of /usr, /bin, /sbin, /lib*, /etc/ld.so.cache, the interpreter's
  prefix and `SandboxConfig.ro_paths`. The working directory /box (holding
  solution.py), /tmp and /dev/shm are fresh size-limited tmpfs (``disk_mb``) that vanish
  with the run; /dev has null, zero, full, random and urandom only; /proc is that of the
  new pid namespace. The host's /etc, /home, /root, /tmp and the caller's files are not
  there to read, and nothing outside the tmpfs mounts can be written or deleted.
- Identity: a user namespace maps the program's uid 1000 to host uid
  ``HOST_ID_BASE + 1000`` (never root, owning no host file), with no capabilities (empty
  bounding set, securebits locked, no_new_privs). Setup runs as the namespace's root,
  host uid ``HOST_ID_BASE``. So RLIMIT_NPROC is enforced even when the caller is root.
- Processes: a pid namespace (the program sees only its own processes and cannot name,
  let alone signal, the caller; its pid 1 is another uid); a new session; when the run
  ends or times out, the namespace's pid 1 dies and the kernel kills every process in it.
  The launcher is a child subreaper and returns only once all of them are reaped.
- Network: a new network namespace with only a loopback that is down: no connection to
  anything, the host's 127.0.0.1 and abstract unix sockets included. New IPC and UTS
  namespaces too.
- Environment: cleared to PATH, HOME and LANG.
- Resources per process: RLIMIT_CPU (timeout + 1 s), RLIMIT_AS (``mem_mb``),
  RLIMIT_FSIZE, RLIMIT_NOFILE, RLIMIT_NPROC (``max_procs``, threads count), no core
  files; a wall-clock timeout per program (all its tests, counted from the harness's
  start; the sandbox's own start-up may take ``SETUP_SLACK_S`` more); output
  (stdout + stderr together) captured up to ``max_output_bytes``, past that the run is
  killed (reason ``forbidden``).

What it does not contain: total memory across the program's processes (each may take
``mem_mb``; ``max_procs * mem_mb`` bounds it); CPU use of several threads at once; the
shared kernel (no seccomp filter, not a VM: a kernel exploit escapes); reads of the bound
read-only paths (system libraries, the interpreter); forged results (assert tests run in
the program's own process, which could rewrite the harness's report: the sandbox protects
the host, not the reward); in stdin/stdout mode the program can kill the harness (same
uid), which ends its run as ``crash``. Submounts below bound paths are remounted read-only
too. Mounting /proc may be refused inside some containers; the program then has no /proc.

Where namespaces cannot be created (unshare refused: a seccomp profile, user namespaces
disabled), running untrusted code raises `BackendUnavailable` unless
``SandboxConfig.allow_unsafe`` is set; then (``isolation="none"``) the program gets only
the rlimits, a new session, a cleared environment, a fresh scratch directory under
``tmp_dir`` and, when the caller is root (and the interpreter is usable by others),
uid 65534, else the caller's uid. It can then read world-readable
files, use the network, write world-writable places and signal its own uid's processes.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import marshal
import math
import os
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path
from types import CodeType
from typing import Any, Literal

from posttrain.errors import BackendUnavailable, ConfigError, DataError
from posttrain.rewards import _sandbox_harness
from posttrain.rewards._sandbox_harness import read_capped
from posttrain.rewards.code_tests import Program, parse_tests, program_from_record

__all__ = [
    "Program",
    "SandboxConfig",
    "SandboxResult",
    "check_file",
    "parse_tests",
    "run_program",
    "run_programs",
]

Reason = Literal["ok", "timeout", "memory", "crash", "wrong_answer", "syntax_error", "forbidden"]
REASONS: tuple[str, ...] = ("ok", "timeout", "memory", "crash", "wrong_answer", "syntax_error", "forbidden")
HOST_ID_BASE = 1_500_000_000  # host uids/gids HOST_ID_BASE and HOST_ID_BASE + 1000 must own nothing
INNER_UID = 1000
UNSAFE_UID = 65534  # "nobody", for isolation="none" when the caller is root
SYSTEM_PATHS = ("/usr", "/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32", "/etc/ld.so.cache")
SETUP_SLACK_S = 2.0  # sandbox start-up under load, on top of the program's timeout
GRACE_S = 0.25  # past the timeout, for the harness to report its own (per-case) timeout
REPORT_CAP = 1 << 20
LAUNCHER = Path(__file__).with_name("_sandbox_launch.py")
log = logging.getLogger(__name__)
_probe_lock = threading.Lock()
_probe_cache: dict[tuple[str, ...], str | None] = {}


@dataclass(frozen=True)
class SandboxConfig:
    """Limits and isolation of the code sandbox."""

    timeout_s: float = 10.0
    """Wall-clock limit per program, all its tests together (a Program may override)."""
    mem_mb: int = 512
    """Address-space limit per process, MiB (a Program may override)."""
    max_procs: int = 16
    """RLIMIT_NPROC: processes and threads of the program at once."""
    max_open_files: int = 64
    """RLIMIT_NOFILE."""
    max_file_mb: int = 16
    """RLIMIT_FSIZE: largest file the program may write, MiB."""
    disk_mb: int = 64
    """Size of each tmpfs (/box, /tmp, /dev/shm), MiB."""
    max_output_bytes: int = 1 << 16
    """Captured stdout + stderr; more kills the run (reason ``forbidden``)."""
    workers: int = 4
    """Programs run at once by `run_programs`."""
    isolation: Literal["auto", "namespaces", "none"] = "auto"
    """``namespaces`` (see module docstring), ``none`` (needs allow_unsafe), or ``auto``."""
    allow_unsafe: bool = False
    """Permit isolation ``none`` (``auto`` falls back to it when namespaces fail)."""
    ro_paths: tuple[str, ...] = ()
    """Extra host paths the program may read (e.g. a site-packages directory)."""
    tmp_dir: str | None = None
    """Where the per-run scratch directories go (default: the system temp dir)."""

    def __post_init__(self) -> None:
        minimum = {"timeout_s": 0.01, "mem_mb": 32, "max_procs": 2, "max_open_files": 8, "max_file_mb": 1}
        minimum |= {"disk_mb": 1, "max_output_bytes": 1, "workers": 1}
        for name, low in minimum.items():
            value = getattr(self, name)
            if not isinstance(value, int | float) or isinstance(value, bool) or value < low:
                raise ConfigError(f"{name} must be a number >= {low}, got {value!r}", where=f"sandbox.{name}")


@dataclass(frozen=True)
class SandboxResult:
    """Outcome of one program: tests passed of total, why it stopped, and its output."""

    passed: int
    total: int
    reason: Reason
    detail: str = ""
    output: str = ""


def sandbox_paths(extra: Iterable[str] = ()) -> tuple[list[str], list[list[str]]]:
    """(host paths bound read-only, top-level symlinks to recreate such as /bin -> usr/bin)."""
    binds: list[str] = []
    links: list[list[str]] = []
    real_python = os.path.realpath(sys.executable)
    for path in (*SYSTEM_PATHS, sys.base_prefix, os.path.dirname(real_python), *extra):
        path = os.path.abspath(path)
        if not os.path.lexists(path) or any(path == b or path.startswith(b.rstrip("/") + "/") for b in binds):
            continue
        if os.path.islink(path) and os.path.dirname(path) == "/" and not os.path.isabs(os.readlink(path)):
            links.append([path, os.readlink(path)])
        else:
            binds.append(path)
    return binds, links


def _world_usable(path: str) -> bool:
    """Whether every directory on ``path`` is searchable by other users (o+x)."""
    parts = Path(path).resolve().parts
    return all(os.stat(os.path.join(*parts[:i])).st_mode & stat.S_IXOTH for i in range(1, len(parts)))


def _unsafe_uid(workdir: str) -> int | None:
    """The uid for isolation="none": "nobody" when the caller is root and "nobody" can use
    the interpreter and the scratch directory, else None (the caller's own uid)."""
    if os.geteuid() != 0 or not (_world_usable(sys.base_prefix) and _world_usable(workdir)):
        return None
    return UNSAFE_UID


def build_job(program: Program, config: SandboxConfig, isolation: str, workdir: str) -> dict[str, Any]:
    """The launcher's job: program, tests, limits and the filesystem to build."""
    kind, setup, cases = parse_tests(program.tests, program.entry_point)
    if not isinstance(program.code, str):
        raise DataError("code must be a string", where="code")
    timeout = float(program.timeout_s or config.timeout_s)
    binds, links = sandbox_paths(config.ro_paths)
    home = "/box" if isolation == "namespaces" else os.path.join(workdir, "box")
    return {
        "isolation": isolation,
        "kind": kind,
        "code": program.code,
        "setup": setup,
        "cases": cases,
        "entry_point": program.entry_point,
        "files": {"solution.py": program.code},
        "timeout_s": timeout,
        "hard_timeout_s": int(timeout + SETUP_SLACK_S + 10),
        "cpu_s": math.ceil(timeout) + 1,
        "mem_mb": int(program.mem_mb or config.mem_mb),
        "file_mb": config.max_file_mb,
        "max_open_files": config.max_open_files,
        "max_procs": config.max_procs,
        "disk_mb": config.disk_mb,
        "max_output_bytes": config.max_output_bytes,
        "python": os.path.realpath(sys.executable),
        "ro_paths": binds,
        "symlinks": links,
        "workdir": workdir,
        "host_id_base": HOST_ID_BASE,
        "inner_uid": INNER_UID,
        "unsafe_uid": _unsafe_uid(workdir) if isolation == "none" else None,
        "env": {"PATH": "/usr/local/bin:/usr/bin:/bin", "HOME": home, "TMPDIR": home, "LANG": "C.UTF-8"},
        "harness_code": _harness_code(),
    }


@functools.cache
def _harness_code() -> CodeType:
    """The harness module compiled once; the launcher execs it (same interpreter binary)."""
    from posttrain.rewards.code_tests import PARSE_LOCK

    path = Path(_sandbox_harness.__file__)
    with PARSE_LOCK:
        return compile(path.read_text(encoding="utf-8"), str(path), "exec")


def _stop(proc: subprocess.Popen) -> None:
    """Ask the launcher to kill its tree (it reaps everything first); SIGKILL its group if it hangs."""
    try:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=5)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


class _Clock:
    """The run's deadline: ``timeout_s`` from the harness's ``start`` line (+ `GRACE_S`),
    and at most ``timeout_s + SETUP_SLACK_S`` from the launch."""

    def __init__(self, timeout_s: float):
        self.timeout_s = timeout_s
        self.latest = time.monotonic() + timeout_s + SETUP_SLACK_S
        self.started: float | None = None

    def __call__(self, bufs: dict[str, bytearray]) -> float:
        if self.started is None and b'"start"' in bufs["report"][:64]:
            self.started = time.monotonic()
        if self.started is None:
            return self.latest
        return min(self.latest, self.started + self.timeout_s + GRACE_S)


def _launch(job: dict[str, Any], config: SandboxConfig) -> tuple[list[dict], str, str, int]:
    """Run the launcher on ``job``: (report events, output, how reading stopped, exit code)."""
    proc = subprocess.Popen(
        [job["python"], "-I", "-S", "-B", str(LAUNCHER), job["workdir"]],  # workdir: names strays in ps
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        cwd=job["workdir"],
        env={"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8"},
        start_new_session=True,
    )
    try:
        with contextlib.suppress(BrokenPipeError):  # a launcher that died at start-up shows below
            proc.stdin.write(marshal.dumps(job))
            proc.stdin.flush()
        with contextlib.suppress(BrokenPipeError):
            proc.stdin.close()
        fds = {"report": proc.stdout.fileno(), "output": proc.stderr.fileno()}
        clock = _Clock(job["timeout_s"])
        bufs, how = read_capped(fds, clock, {"report": REPORT_CAP, "output": config.max_output_bytes})
        if how == "eof":
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                how = "timeout"
    finally:
        if proc.returncode is None:
            _stop(proc)
        proc.stdout.close()
        proc.stderr.close()
    events = []
    for line in bufs["report"].decode("utf-8", "replace").splitlines():
        try:
            event = json.loads(line)
        except ValueError:
            continue
        if isinstance(event, dict):
            events.append(event)
    output = bufs["output"][: config.max_output_bytes].decode("utf-8", "replace")
    return events, output, how, proc.returncode


def _verdict(events: list[dict], output: str, how: str, code: int, job: dict[str, Any]) -> SandboxResult:
    """Combine the harness's report with how the run ended."""
    total = len(job["cases"])
    passed = sum(1 for e in events if e.get("event") == "test" and e.get("ok") is True)
    end = next((e for e in reversed(events) if e.get("event") == "end"), None)
    if how == "timeout":
        return SandboxResult(passed, total, "timeout", f"wall-clock limit of {job['timeout_s']:g} s", output)
    if how == "overflow":
        return SandboxResult(
            passed, total, "forbidden", f"output over {job['max_output_bytes']} bytes", output
        )
    if end is not None and end.get("reason") in REASONS and isinstance(end.get("passed"), int):
        return SandboxResult(
            min(end["passed"], total), total, end["reason"], str(end.get("detail", "")), output
        )
    setup = next((e for e in events if e.get("event") == "setup_error"), None)
    if setup is not None:
        return SandboxResult(passed, total, "crash", f"sandbox setup failed: {setup.get('detail')}", output)
    if "MemoryError" in output[-2000:]:
        return SandboxResult(passed, total, "memory", "MemoryError", output)
    if code == 128 + signal.SIGXCPU:
        return SandboxResult(passed, total, "timeout", "CPU time limit", output)
    why = f"killed by signal {code - 128}" if code > 128 else f"exit status {code}"
    return SandboxResult(passed, total, "crash", f"the program ended the harness ({why})", output)


def _run_one(program: Program, config: SandboxConfig, isolation: str) -> SandboxResult:
    """One program in a fresh scratch directory, removed afterwards."""
    workdir = tempfile.mkdtemp(prefix="posttrain-sandbox-", dir=config.tmp_dir)
    try:
        os.chmod(workdir, 0o711)  # isolation "none": uid "nobody" works in workdir/box
        job = build_job(program, config, isolation, workdir)
        events, output, how, code = _launch(job, config)
        return _verdict(events, output, how, code, job)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


def namespace_problem(config: SandboxConfig) -> str | None:
    """None when namespaced runs work here, else why not (probed once per process)."""
    key = tuple(config.ro_paths)
    with _probe_lock:
        if key not in _probe_cache:
            probe = Program("x = 1", ["assert x == 1"], timeout_s=10)
            try:
                res = _run_one(probe, replace(config, workers=1), "namespaces")
                _probe_cache[key] = None if res.reason == "ok" else f"{res.reason}: {res.detail}"
            except OSError as exc:
                _probe_cache[key] = f"{type(exc).__name__}: {exc}"
        return _probe_cache[key]


def choose_isolation(config: SandboxConfig) -> str:
    """``namespaces`` or ``none`` for this config; refuses unsafe runs unless allowed."""
    if config.isolation == "none":
        if not config.allow_unsafe:
            raise ConfigError(
                "isolation='none' runs untrusted code without containment",
                where="sandbox.isolation",
                fix="set allow_unsafe=True (trusted code only) or use isolation='namespaces'",
            )
        return "none"
    if config.isolation not in ("auto", "namespaces"):
        raise ConfigError(
            f"unknown isolation {config.isolation!r}",
            where="sandbox.isolation",
            fix="auto, namespaces or none",
        )
    problem = namespace_problem(config)
    if problem is None:
        return "namespaces"
    if config.isolation == "auto" and config.allow_unsafe:
        log.warning("code sandbox without namespaces (%s): untrusted code is NOT contained", problem)
        return "none"
    raise BackendUnavailable(
        f"the code sandbox cannot create user/mount/pid/net namespaces here ({problem})",
        where="sandbox",
        fix="run where unprivileged user namespaces are allowed (sysctl kernel.unprivileged_userns_clone=1; "
        "docker: --security-opt seccomp=unconfined), or set allow_unsafe=True to run trusted code uncontained",
    )


def run_program(program: Program, config: SandboxConfig | None = None) -> SandboxResult:
    """Run one program against its tests in the sandbox."""
    config = config or SandboxConfig()
    return _run_one(program, config, choose_isolation(config))


def run_programs(programs: Iterable[Program], config: SandboxConfig | None = None) -> list[SandboxResult]:
    """Run programs ``config.workers`` at a time; results in input order."""
    config = config or SandboxConfig()
    programs = list(programs)
    if not programs:
        return []
    isolation = choose_isolation(config)
    with ThreadPoolExecutor(max_workers=max(1, config.workers)) as pool:
        return list(pool.map(lambda p: _run_one(p, config, isolation), programs))


def check_file(
    path: str | Path, config: SandboxConfig | None = None, detail: bool = False
) -> Iterator[dict[str, Any]]:
    """Run every program of a JSONL file; yields ``{"passed", "total", "reason"}`` (plus
    ``detail`` if asked) per line, in order. The whole file is validated before any run."""
    config = config or SandboxConfig()
    programs = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except ValueError as exc:
                raise DataError(f"invalid JSON: {exc}", where=f"{path}:{lineno}") from exc
            programs.append(program_from_record(record, where=f"{path}:{lineno}"))
    window = max(1, config.workers) * 4
    for start in range(0, len(programs), window):
        for res in run_programs(programs[start : start + window], config):
            row = {"passed": res.passed, "total": res.total, "reason": res.reason}
            yield {**row, "detail": res.detail} if detail else row
