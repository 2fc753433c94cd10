"""The code sandbox: verdicts, hostile programs contained, nothing left behind on the host."""

from __future__ import annotations

import json
import os
import socket
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from posttrain.errors import BackendUnavailable, ConfigError, DataError
from posttrain.rewards import sandbox
from posttrain.rewards.sandbox import (
    Program,
    SandboxConfig,
    check_file,
    namespace_problem,
    parse_tests,
    program_from_record,
    run_program,
    run_programs,
)

SECRET = "hunter2-not-for-sandboxes"
DAEMON_MARKER = "posttrain-test-daemon-marker"


@pytest.fixture(scope="module")
def namespaces():
    problem = namespace_problem(SandboxConfig())
    if problem is not None:
        pytest.skip(f"namespaces unavailable here: {problem}")


@dataclass
class Host:
    """What the hostile programs aim at, and how to check it survived."""

    outside: Path
    scratch: Path
    server: socket.socket

    def config(self, **kw) -> SandboxConfig:
        return SandboxConfig(tmp_dir=str(self.scratch), **kw)

    def assert_unharmed(self) -> None:
        assert self.outside.read_text() == "precious"
        assert list(self.scratch.iterdir()) == []  # every run's scratch dir was removed
        os.kill(os.getppid(), 0)  # our parent lives too
        assert _processes_mentioning(str(self.scratch)) == []  # launcher tree: argv names its scratch dir
        assert _processes_mentioning(DAEMON_MARKER) == []
        with pytest.raises(BlockingIOError):
            self.server.accept()  # nobody connected


def _processes_mentioning(marker: str) -> list[int]:
    """Pids whose command line contains ``marker`` (a /proc scan; ours excluded)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if marker in cmdline:
            found.append(int(entry.name))
    return found


@pytest.fixture
def host(tmp_path, monkeypatch):
    outside = tmp_path / "outside.txt"
    outside.write_text("precious")
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    monkeypatch.setenv("POSTTRAIN_FAKE_SECRET", SECRET)
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen()
    server.setblocking(False)
    yield Host(outside, scratch, server)
    server.close()


def test_verdicts_pass_wrong_syntax_and_io(namespaces, host):
    square = "def sq(x):\n    return x * x\n"
    programs = [
        Program(square, ["assert sq(3) == 9", "assert sq(-2) == 4"]),
        Program(square, ["assert sq(3) == 9", "assert sq(2) == 5", "assert sq(0) == 0"]),
        Program("def sq(x) return x", ["assert sq(1) == 1"]),
        Program(
            "n = int(input())\nprint(n * 2)  \n\n",
            [{"input": "4\n", "output": "8"}, {"input": "5", "output": "11"}],
        ),
        Program(square, "import math\nassert sq(2) == 4\nassert math.isclose(sq(0.5), 0.25)\n"),
        Program(square, "def check(candidate):\n    assert candidate(5) == 25\n", entry_point="sq"),
        Program(square, ["assert candidate(4) == 16"], entry_point="square"),
    ]
    got = [(r.passed, r.total, r.reason) for r in run_programs(programs, host.config())]
    assert got == [
        (2, 2, "ok"),
        (2, 3, "wrong_answer"),
        (0, 1, "syntax_error"),
        (1, 2, "wrong_answer"),
        (2, 2, "ok"),
        (1, 1, "ok"),
        (0, 1, "crash"),  # the entry point is not defined
    ]
    host.assert_unharmed()


HOSTILE = {  # name: (code, expected reason); the test fills in {outside} and {pid}
    "infinite_loop": ("while True:\n    pass", "timeout"),
    "memory_bomb": ("x = bytearray(64 * 2**30)", "memory"),
    "memory_creep": ("a = []\nwhile True:\n    a.append(' ' * 10**7)", "memory"),
    "fork_bomb": ("import os\nwhile True:\n    os.fork()", "forbidden"),
    "stubborn_fork_bomb": (
        "import os\nwhile True:\n    try:\n        os.fork()\n    except OSError:\n        pass",
        "timeout",
    ),
    "write_outside": ("open({outside!r}, 'w').write('pwned')", "forbidden"),
    "delete_outside": ("import os\nos.remove({outside!r})", "forbidden"),
    "write_system": ("open('/usr/pwned-by-sandbox', 'w').write('x')", "forbidden"),
    "read_outside": ("print(open({outside!r}).read())", "forbidden"),
    "read_shadow": ("print(open('/etc/shadow').read())", "forbidden"),
    "read_init_environ": ("print(open('/proc/1/environ').read())", "forbidden"),
    "connect_host": (
        "import socket\nsocket.create_connection(('127.0.0.1', {port}), timeout=3)",
        "forbidden",
    ),
    "kill_parent": ("import os\nos.kill(os.getppid(), 9)", "forbidden"),
    "kill_caller": ("import os\nos.kill({pid}, 9)", "forbidden"),
    "kill_own_group": ("import os\nos.killpg(os.getpgid(0), 9)", "crash"),  # only kills itself
    "huge_output": ("while True:\n    print('x' * 10000)", "forbidden"),
    "daemon": (
        "import os, sys\nif os.fork() == 0:\n    os.setsid()\n"
        "    os.execv(sys.executable, [sys.executable, '-c', 'import time; time.sleep(60)', '"
        + DAEMON_MARKER
        + "'])",
        "ok",
    ),
}


@pytest.mark.parametrize("name", list(HOSTILE))
def test_hostile_program_is_contained(namespaces, host, name):
    code, reason = HOSTILE[name]
    code = code.format(outside=str(host.outside), pid=os.getpid(), port=host.server.getsockname()[1])
    # 1 s where the program must be stopped by the clock; programs stopped by another limit get
    # 10 s, so a loaded machine (a slow interpreter start) cannot turn their reason into "timeout"
    limit = 1.0 if reason == "timeout" else 10.0
    config = host.config(timeout_s=limit, max_output_bytes=10_000)
    start = time.monotonic()
    res = run_program(Program(code, ["assert True"]), config)
    elapsed = time.monotonic() - start
    assert res.reason == reason, res
    assert elapsed < limit + 2.5
    assert "precious" not in res.output and len(res.output) <= 10_000
    if name == "daemon":
        time.sleep(0.2)  # the daemon would have started by now
    host.assert_unharmed()
    assert not Path("/usr/pwned-by-sandbox").exists()


def test_environment_is_cleared_and_host_hidden(namespaces, host):
    code = "import os\nenv = dict(os.environ)\nprint(env)\nroot = sorted(os.listdir('/'))\nuid = os.getuid()"
    tests = [
        "assert 'POSTTRAIN_FAKE_SECRET' not in env",
        "assert set(env) <= {'PATH', 'HOME', 'TMPDIR', 'LANG'}",
        "assert 'home' not in root and not os.path.exists('/etc/passwd')",
        "assert uid != 0 and os.getcwd() == '/box'",
        "assert sorted(os.listdir('/proc'))[0].isdigit() and len([p for p in os.listdir('/proc') if p.isdigit()]) <= 3",
    ]
    res = run_program(Program(code, tests), host.config())
    assert (res.passed, res.reason) == (5, "ok"), res
    assert SECRET not in res.output
    host.assert_unharmed()


def test_stdin_program_cannot_escape_either(namespaces, host):
    code = "import os\nos.kill(os.getppid(), 9)"  # in io mode the parent is the harness (same uid)
    res = run_program(Program(code, [{"input": "", "output": ""}]), host.config())
    assert res.reason == "crash" and res.passed == 0
    slow = run_program(
        Program("while True: pass", [{"input": "", "output": ""}] * 2, timeout_s=1.0), host.config()
    )
    assert (slow.passed, slow.total, slow.reason) == (0, 2, "timeout")
    host.assert_unharmed()


def test_unavailable_namespaces_refuse_unless_unsafe_is_allowed(monkeypatch, host):
    monkeypatch.setattr(sandbox, "namespace_problem", lambda config: "unshare: Operation not permitted")
    with pytest.raises(BackendUnavailable, match="allow_unsafe"):
        run_program(Program("x = 1", ["assert x == 1"]), host.config())
    with pytest.raises(ConfigError, match="without containment"):
        run_program(Program("x = 1", ["assert x == 1"]), host.config(isolation="none"))
    unsafe = host.config(allow_unsafe=True, timeout_s=1.0)
    assert run_program(Program("x = 1", ["assert x == 1"]), unsafe).reason == "ok"
    assert run_program(Program("while True: pass", ["assert 1"]), unsafe).reason == "timeout"
    host.assert_unharmed()


def test_malformed_tests_are_data_errors():
    with pytest.raises(DataError, match="non-empty list"):
        parse_tests([])
    with pytest.raises(DataError, match="test 1 is not valid Python"):
        parse_tests(["assert 1", "assert ("])
    with pytest.raises(DataError, match="string 'input' and 'output'"):
        parse_tests([{"input": "1"}])
    with pytest.raises(DataError, match="no top-level assert"):
        parse_tests("x = 1")
    assert parse_tests("import m\nassert f(1)\nassert (\n  g()\n)\n") == (
        "assert",
        "import m",
        ["assert f(1)", "assert (\n  g()\n)"],
    )
    with pytest.raises(DataError, match="unknown keys"):
        program_from_record({"code": "", "tests": ["assert 1"], "timeout": 3})


def test_check_file_streams_one_verdict_per_line(namespaces, host, tmp_path):
    path = tmp_path / "programs.jsonl"
    rows = [
        {"code": "def f(x):\n    return -x", "tests": ["assert f(2) == -2"], "timeout_s": 3},
        {"code": "print(input()[::-1])", "tests": [{"input": "ab", "output": "ba"}], "mem_mb": 256},
        {
            "code": "def f(x):\n    return x",
            "tests": "def check(candidate):\n    assert candidate(1) == 2\n",
            "entry_point": "f",
        },
    ]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n\n")
    got = list(check_file(path, host.config()))
    assert got == [
        {"passed": 1, "total": 1, "reason": "ok"},
        {"passed": 1, "total": 1, "reason": "ok"},
        {"passed": 0, "total": 1, "reason": "wrong_answer"},
    ]
    path.write_text('{"code": "x = 1", "tests": ["assert x"]}\nnot json\n')
    with pytest.raises(DataError, match=r"programs.jsonl:2"):
        list(check_file(path, host.config()))
    host.assert_unharmed()
