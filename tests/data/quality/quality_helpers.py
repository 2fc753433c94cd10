"""Helpers for the data-quality tests: items from hand-made rows, JSONL files."""

from __future__ import annotations

import json

from posttrain.data.quality.items import Item
from posttrain.data.records import detect_kind, validate_record


def make_item(row: dict, where: str = "t.jsonl:1", source: int = 0) -> Item:
    kind = detect_kind(row)
    return Item(row, validate_record(row, kind, where), where, kind, source)


def chat(user: str, assistant: str, **extra) -> dict:
    return {
        "messages": [{"role": "user", "content": user}, {"role": "assistant", "content": assistant}],
        **extra,
    }


def write_jsonl(path, rows) -> str:
    with open(path, "w", encoding="utf-8") as f:
        for row in rows:
            f.write((row if isinstance(row, str) else json.dumps(row)) + "\n")
    return str(path)


def read_jsonl(path) -> list:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]
