"""``posttrain sandbox ...``: thin CLI wrappers over `posttrain.rewards.sandbox`."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

sandbox_app = typer.Typer(
    no_args_is_help=True, help="Run untrusted Python code against tests in the sandbox."
)


@sandbox_app.callback()
def _sandbox() -> None:
    """Run untrusted Python code against tests in the sandbox (a group even with one command)."""


@sandbox_app.command("check")
def check(
    file: Annotated[
        Path,
        typer.Argument(help='JSONL: {"code", "tests", "entry_point"?, "timeout_s"?, "mem_mb"?} per line.'),
    ],
    workers: Annotated[int, typer.Option(help="Programs run at once.")] = 4,
    timeout_s: Annotated[float, typer.Option(help="Default wall-clock limit per program.")] = 10.0,
    mem_mb: Annotated[int, typer.Option(help="Default address-space limit per process, MiB.")] = 512,
    detail: Annotated[bool, typer.Option(help="Add a 'detail' field to each result.")] = False,
    allow_unsafe: Annotated[
        bool, typer.Option(help="Run without namespaces where they are unavailable (trusted code only!).")
    ] = False,
) -> None:
    """Run each program against its tests; print one {"passed", "total", "reason"} line per input line,
    after the line's own extra fields (``id``, ``task_id``...)."""
    from posttrain.rewards.code_tests import record_extras
    from posttrain.rewards.sandbox import SandboxConfig, check_file

    config = SandboxConfig(workers=workers, timeout_s=timeout_s, mem_mb=mem_mb, allow_unsafe=allow_unsafe)
    rows = check_file(file, config, detail=detail)  # validates the whole file before the first row
    lines = (line for line in file.read_text(encoding="utf-8").splitlines() if line.strip())
    for row in rows:
        typer.echo(json.dumps({**record_extras(json.loads(next(lines))), **row}))
