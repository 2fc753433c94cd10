"""STYLE habit 13: the size gate. Files of the package stay <= 600 lines and functions <= 80."""

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "posttrain"
MAX_FILE_LINES, MAX_FUNCTION_LINES = 600, 80


def test_files_and_functions_stay_small():
    too_long = []
    for path in sorted(PACKAGE.rglob("*.py")):
        text = path.read_text()
        name = path.relative_to(PACKAGE.parent)
        if len(text.splitlines()) > MAX_FILE_LINES:
            too_long.append(f"{name}: {len(text.splitlines())} lines")
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                lines = node.end_lineno - node.lineno + 1
                if lines > MAX_FUNCTION_LINES:
                    too_long.append(f"{name}:{node.lineno} {node.name}(): {lines} lines")
    assert not too_long, "split these (STYLE.md habit 13):\n" + "\n".join(too_long)
