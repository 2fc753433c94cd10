"""Fixtures of the data-quality tests."""

from __future__ import annotations

import pytest
from quality_helpers import write_jsonl


@pytest.fixture
def jsonl(tmp_path):
    """``jsonl(name, rows) -> path``: rows (dicts, or raw lines as strings) written under tmp_path."""

    def write(name, rows):
        return write_jsonl(tmp_path / name, rows)

    return write
