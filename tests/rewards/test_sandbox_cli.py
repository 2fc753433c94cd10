"""``posttrain sandbox check FILE.jsonl`` (the typer sub-app the main CLI mounts)."""

from __future__ import annotations

import json

from typer.testing import CliRunner

from posttrain.rewards.cli import sandbox_app
from posttrain.rewards.sandbox import SandboxConfig, namespace_problem


def test_check_prints_one_json_line_per_program(tmp_path):
    path = tmp_path / "p.jsonl"
    rows = [
        {"code": "def f():\n    return 1", "tests": ["assert f() == 1"]},
        {"code": "def f(:", "tests": ["assert f() == 1"]},
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    unsafe = [] if namespace_problem(SandboxConfig()) is None else ["--allow-unsafe"]
    result = CliRunner().invoke(sandbox_app, ["check", str(path), "--workers", "2", *unsafe])
    assert result.exit_code == 0, result.output
    lines = [json.loads(line) for line in result.output.splitlines()]
    assert lines == [
        {"passed": 1, "total": 1, "reason": "ok"},
        {"passed": 0, "total": 1, "reason": "syntax_error"},
    ]
    detailed = CliRunner().invoke(sandbox_app, ["check", str(path), "--detail", *unsafe])
    assert "SyntaxError" in json.loads(detailed.output.splitlines()[1])["detail"]
