"""The stream every cleaning step reads and writes: `Item`s read from data files, with their texts.

`read_source` streams one file of any format the data layer reads (``posttrain.data.loaders``),
validating each row as `load_records` does; an invalid row becomes an `Item` already
removed under the rule ``invalid`` (``on_invalid="drop"``) or stops the run with its
`DataError` naming file:line (``on_invalid="stop"``). A step is a generator over items:
it passes removed items through untouched and marks the ones it drops with a `Removal`
(rule + evidence), so the final writer sees every item once, in input order.
"""

from __future__ import annotations

import contextlib
import unicodedata
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from posttrain.data.loaders import (  # the loader's own row readers (JSON, Parquet, HF folder)
    _iter_rows,
    jsonl_lines,
)
from posttrain.data.records import detect_kind, validate_record
from posttrain.errors import DataError

RULES = (
    "invalid",
    "length",
    "language",
    "symbols",
    "repetition",
    "unverified",
    "exact_dup",
    "near_dup",
    "contaminated",
    "perplexity",
    "judge",
)
"""Rule names of the report, in step order."""


@dataclass
class Removal:
    """Why an item was dropped: one of `RULES` and what showed it."""

    rule: str
    evidence: dict[str, Any] = field(default_factory=dict)


@dataclass
class Item:
    """One input row on its way through the steps."""

    raw: Any
    """The row as read (kept rows are written back unchanged, so kept.jsonl keeps the input format)."""
    data: dict | None
    """The validated, normalised record (`validate_record`); None when the row is invalid."""
    where: str
    """``file:line`` (or ``file:row N``) of the row."""
    kind: str | None = None
    source: int = 0
    """Index of the input the row came from."""
    removed: Removal | None = None
    n_tokens: int | None = None
    """Token count under the recipe's tokenizer, once a step has computed it."""
    flags: dict | None = None
    """What the judge checklist flagged on a kept item (``judge.remove: false``), else None."""
    pre: dict | None = None
    """Step results computed elsewhere (the Ray engine's workers): ``minhash`` (the near-dedup
    MinHash values), ``contaminated`` (decontamination evidence or None)."""
    _text: str | None = None
    _norm: str | None = None

    @property
    def text(self) -> str:
        """All message text of the record (`record_text`), computed once."""
        if self._text is None:
            self._text = record_text(self.data, self.kind) if self.data is not None else ""
        return self._text

    @property
    def norm(self) -> str:
        """`normalize_text` of `text`, computed once (exact dedup, near dedup and decontamination read it)."""
        if self._norm is None:
            self._norm = normalize_text(self.text)
        return self._norm

    def drop(self, rule: str, **evidence: Any) -> Item:
        self.removed = Removal(rule, evidence)
        return self


def normalize_text(text: str) -> str:
    """NFKC, casefold, whitespace runs folded to one space, ends stripped."""
    return " ".join(unicodedata.normalize("NFKC", text).casefold().split())


def messages_of(data: dict, kind: str) -> list[tuple[str, dict]]:
    """``(field path, message)`` for every message of a normalised record, in record order."""
    fields = {
        "chat": ["messages"],
        "prompt_completion": ["prompt", "completion"],
        "preference": ["prompt", "chosen", "rejected"],
        "ranking": ["prompt"],
        "prompt": ["prompt"],
    }[kind]
    out = [(f"{name}[{i}]", m) for name in fields for i, m in enumerate(data[name])]
    if kind == "ranking":
        for r, response in enumerate(data["responses"]):
            out += [(f"responses[{r}][{i}]", m) for i, m in enumerate(response)]
    return out


def message_text(message: dict) -> str:
    """A message's reasoning (when stored apart) then its content."""
    reasoning = message.get("reasoning_content")
    return f"{reasoning}\n{message['content']}" if reasoning else message["content"]


def record_text(data: dict, kind: str) -> str:
    """Every message's text joined by newlines: what filters, dedup and decontamination read."""
    return "\n".join(message_text(m) for _, m in messages_of(data, kind))


def question_text(data: dict, kind: str) -> str:
    """The question of a record: its first user message (chat), or the user turns of its prompt."""
    if kind == "chat":
        users = [m["content"] for m in data["messages"] if m["role"] == "user"]
        return users[0] if users else ""
    return "\n".join(m["content"] for m in data["prompt"] if m["role"] == "user")


def read_source(
    path: str | Path,
    *,
    source: int = 0,
    kind: str | None = None,
    split: str = "train",
    on_invalid: str = "drop",
    n_per_level: int = 200,
    seed: int = 0,
) -> Iterator[Item]:
    """Stream ``path`` as items; the kind is ``kind`` or that of the first row whose kind can be told.

    ``tasks`` / ``task:NAME`` stream the task suite's ``split`` instead (`task_rows`)."""
    for row, where, error, row_kind in row_tuples(path, kind, split, n_per_level, seed):
        yield row_item(row, where, error, row_kind, source, on_invalid)


def row_tuples(
    path: str | Path, kind: str | None = None, split: str = "train", n_per_level: int = 200, seed: int = 0
) -> Iterator[tuple[Any, str, DataError | None, str | None]]:
    """``(row, where, error, kind of the file so far)`` of every row of an input, for `row_item`."""
    if str(path) == "tasks" or str(path).startswith("task:"):
        for row, where in task_rows(str(path), split, n_per_level, seed):
            yield row, where, None, "chat"
        return
    for row, where, error in source_rows(path, split):
        if kind is None and error is None:
            with contextlib.suppress(DataError):
                kind = detect_kind(row, where)
        yield row, where, error, kind


def source_rows(path: str | Path, split: str = "train") -> Iterator[tuple[Any, str, DataError | None]]:
    """``(row, where, error)`` of a data file, in file order (a JSONL line that is not JSON: its error)."""
    path = Path(path)
    if path.name.lower().endswith((".jsonl", ".jsonl.gz", ".ndjson")):
        return _jsonl_rows(path)
    return _wrap(_iter_rows(path, split))


def row_item(
    row: Any, where: str, error: DataError | None, kind: str | None, source: int = 0, on_invalid: str = "drop"
) -> Item:
    """One row as an `Item` of a file of ``kind`` records (None: the row's own kind): validated, or
    removed as ``invalid`` (``on_invalid="stop"``: its `DataError` is raised)."""
    try:
        if error is not None:
            raise error
        found = detect_kind(row, where)
        if kind is not None and found != kind:
            raise DataError(
                f"record looks like kind {found!r} but this file holds {kind!r} records",
                where=where,
                fix="keep one record kind per file (split mixed data into separate files)",
            )
        return Item(row, validate_record(row, found, where), where, found, source)
    except DataError as exc:
        if on_invalid == "stop":
            raise
        return Item(row, None, where, kind, source, Removal("invalid", {"error": exc.message}))


def task_rows(spec: str, split: str, n_per_level: int, seed: int) -> Iterator[tuple[dict, str]]:
    """Chat records (question, chain in reasoning_content, answer; metadata names the task as scorer)
    of the task suite: every task for ``tasks``, one for ``task:NAME``."""
    from posttrain.data.tasks import TASKS, task_problems

    names = sorted(TASKS) if spec == "tasks" else [spec.split(":", 1)[1]]
    for name in names:
        if name not in TASKS:
            raise DataError(
                f"unknown task {name!r}", where=spec, fix=f"use tasks or task:NAME, NAME in {sorted(TASKS)}"
            )
    if split not in ("train", "test"):
        raise DataError(f"the task suite has no split {split!r}", where=spec, fix="use split train or test")
    for i, p in enumerate(task_problems(names, split, n_per_level, seed=seed)):
        row = {"messages": p.messages(), "metadata": p.prompt_record()["metadata"]}
        yield row, f"task {p.task} {split} level {p.level} #{i}"


def _wrap(rows: Iterable[tuple[dict, str]]) -> Iterator[tuple[Any, str, DataError | None]]:
    for row, where in rows:
        yield row, where, None


def _jsonl_rows(path: Path) -> Iterator[tuple[Any, str, DataError | None]]:
    """JSONL rows; a line that is not JSON comes back as its error, so the run can drop it and go on."""
    if not path.is_file():
        next(_iter_rows(path, "train"), None)  # the loader's own "not found" error
    yield from jsonl_lines(path)


def chunks(items: Iterable[Item], size: int) -> Iterator[list[Item]]:
    """Lists of up to ``size`` items, for steps that work in batches (tokenizer, scorers)."""
    batch: list[Item] = []
    for item in items:
        batch.append(item)
        if len(batch) >= size:
            yield batch
            batch = []
    if batch:
        yield batch
