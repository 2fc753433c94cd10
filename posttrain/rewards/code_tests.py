"""Programs and their tests for the code sandbox: the record format and its validation.

Tests are assert snippets (a list of strings), a string of Python whose top-level
``assert`` statements are the tests and whose other statements are setup (a
HumanEval-style ``def check(candidate)`` with an ``entry_point`` becomes the single test
``check(<entry_point>)``), or stdin/stdout cases (a list of ``{"input", "output"}``).
"""

from __future__ import annotations

import ast
import difflib
import threading
from dataclasses import dataclass
from typing import Any

from posttrain.errors import DataError

PARSE_LOCK = threading.Lock()
"""CPython 3.11's parser is not thread-safe ("AST constructor recursion depth mismatch" when the
sandbox's thread pool parses tests concurrently): every parse and compile here holds this lock."""


@dataclass(frozen=True)
class Program:
    """Code and its tests; ``timeout_s``/``mem_mb`` override the config's."""

    code: str
    tests: Any
    entry_point: str | None = None
    timeout_s: float | None = None
    mem_mb: int | None = None


def parse_tests(tests: Any, entry_point: str | None = None) -> tuple[str, str, list]:
    """``(kind, setup, cases)`` from a tests field; malformed tests are a `DataError`.

    kind ``assert``: cases are snippets run after ``setup``; kind ``io``: cases are
    ``{"input", "output"}`` dicts.
    """
    if isinstance(tests, str):
        return _split_assert_source(tests, entry_point)
    if isinstance(tests, list) and tests and all(isinstance(t, dict) for t in tests):
        for t in tests:
            if not (isinstance(t.get("input"), str) and isinstance(t.get("output"), str)):
                raise DataError("each stdin/stdout test needs string 'input' and 'output'", where="tests")
        return "io", "", [{"input": t["input"], "output": t["output"]} for t in tests]
    if isinstance(tests, list) and tests and all(isinstance(t, str) for t in tests):
        for i, t in enumerate(tests):
            try:
                with PARSE_LOCK:
                    compile(t, f"test_{i}", "exec")
            except SyntaxError as exc:
                raise DataError(f"test {i} is not valid Python: {exc.msg}", where=f"tests[{i}]") from exc
        return "assert", "", list(tests)
    raise DataError(
        "tests must be a non-empty list of assert strings, a string of asserts, or a list of {input, output}",
        where="tests",
    )


def _split_assert_source(source: str, entry_point: str | None) -> tuple[str, str, list]:
    """Top-level asserts become cases, every other line setup; ``check(entry_point)`` if none."""
    try:
        with PARSE_LOCK:
            tree = ast.parse(source)
    except SyntaxError as exc:
        raise DataError(f"tests are not valid Python: {exc.msg}", where="tests") from exc
    lines = source.splitlines()
    spans = [(n.lineno, n.end_lineno or n.lineno) for n in tree.body if isinstance(n, ast.Assert)]
    cases = ["\n".join(lines[a - 1 : b]) for a, b in spans]
    inside = {i for a, b in spans for i in range(a, b + 1)}
    setup = "\n".join(line for i, line in enumerate(lines, 1) if i not in inside)
    if (
        not cases
        and entry_point
        and any(isinstance(n, ast.FunctionDef) and n.name == "check" for n in tree.body)
    ):
        cases = [f"check({entry_point})"]
    if not cases:
        raise DataError(
            "the tests string has no top-level assert (and no check() with an entry_point)", where="tests"
        )
    return "assert", setup, cases


PROGRAM_KEYS = ("code", "tests", "entry_point", "timeout_s", "mem_mb")


def record_extras(record: Any) -> dict[str, Any]:
    """A program record's other fields (``id``, ``task_id``...), which results carry along."""
    return {k: v for k, v in record.items() if k not in PROGRAM_KEYS} if isinstance(record, dict) else {}


def program_from_record(record: Any, where: str = "record") -> Program:
    """A `Program` from ``{"code", "tests", "entry_point"?, "timeout_s"?, "mem_mb"?}``.

    Other fields (``id``, ``task_id``...) are allowed and ignored here (`record_extras`), but a
    near-miss of a program key (``timeout`` for ``timeout_s``) is an error, not a silent default."""
    if not isinstance(record, dict) or not isinstance(record.get("code"), str) or "tests" not in record:
        raise DataError("a program record needs a string 'code' and 'tests'", where=where)
    typos = {
        k: close[0]
        for k in record_extras(record)
        if (close := difflib.get_close_matches(str(k), PROGRAM_KEYS, n=1, cutoff=0.75))
    }
    if typos:
        raise DataError(
            f"unknown keys {sorted(typos)}",
            where=where,
            fix="did you mean "
            + ", ".join(f"{v!r} for {k!r}" for k, v in sorted(typos.items()))
            + "? keys: code, tests, entry_point, timeout_s, mem_mb (other fields are carried along)",
        )
    timeout, mem = record.get("timeout_s"), record.get("mem_mb")
    if timeout is not None and (not isinstance(timeout, int | float) or timeout <= 0):
        raise DataError("timeout_s must be a positive number", where=where)
    if mem is not None and (not isinstance(mem, int) or mem < 32):
        raise DataError("mem_mb must be an integer >= 32", where=where)
    parse_tests(record["tests"], record.get("entry_point"))
    return Program(record["code"], record["tests"], record.get("entry_point"), timeout, mem)
