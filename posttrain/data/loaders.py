"""Load records from local files: JSONL, JSON, Parquet, or a `save_to_disk` dataset folder.

Every record keeps where it came from, so later errors (rendering, training)
can point at it:

- JSONL:   ``file.jsonl:LINE`` (1-based line number; blank lines are skipped)
- JSON:    ``file.json:row N`` (0-based index into the list, or into ``{"data": [...]}``)
- Parquet: ``file.parquet:row N`` (0-based)
- HF dataset folder (``datasets.Dataset.save_to_disk``): ``folder[split]:row N``

The kind is detected from the first record unless given; every later record must
be of the same kind (the first one that is not is named in the error).
"""

from __future__ import annotations

import gzip
import json
import os
import tempfile
import zlib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from posttrain.data.records import detect_kind, validate_record
from posttrain.errors import DataError

_FORMATS = ".jsonl, .jsonl.gz, .json, .parquet, or a folder written by datasets' save_to_disk"


@dataclass
class Record:
    """One validated, normalised record and where it came from."""

    data: dict
    where: str
    kind: str


def load_records(
    path: str | Path, kind: str | None = None, split: str = "train", limit: int | None = None
) -> list[Record]:
    """Read, validate and normalise up to ``limit`` records from ``path``."""
    rows = _iter_rows(Path(path), split)
    records: list[Record] = []
    for row, where in rows:
        if limit is not None and len(records) >= limit:
            break
        found = detect_kind(row, where)
        if kind is None:
            kind = found
        elif found != kind:
            raise DataError(
                f"record looks like kind {found!r} but this file holds {kind!r} records",
                where=where,
                fix="keep one record kind per file (split mixed data into separate files)",
            )
        records.append(Record(validate_record(row, kind, where), where, kind))
    if not records and limit != 0:
        what = (
            "is empty (0 bytes)"
            if Path(path).is_file() and Path(path).stat().st_size == 0
            else "holds no records"
        )
        raise DataError(f"data file {what}", where=str(path),
                        fix="point at a file with at least one record (was it written completely?)")  # fmt: skip
    return records


def _iter_rows(path: Path, split: str) -> Iterator[tuple[dict, str]]:
    if not path.exists():
        raise DataError(
            f"data file not found: {path}",
            where=str(path),
            fix=f"check the path (relative paths resolve from {Path.cwd()}); supported: {_FORMATS}",
        )
    if path.is_dir():
        return _iter_dataset_dir(path, split)
    name = path.name.lower()
    if name.endswith((".jsonl", ".jsonl.gz", ".ndjson")):
        return _iter_jsonl(path)
    if name.endswith(".json"):
        return _iter_json(path)
    if name.endswith(".parquet"):
        return _iter_parquet(path)
    raise DataError(f"unsupported data file type: {path.name}", where=str(path), fix=f"use {_FORMATS}")


def jsonl_lines(path: Path) -> Iterator[tuple[Any, str, DataError | None]]:
    """(row, "file:line", None) per non-blank JSONL line, or (the line's first 200 characters,
    "file:line", its DataError) for a line that is not UTF-8 or not JSON; callers raise it or
    drop the line. A binary file (NUL bytes) or a corrupt .gz is a DataError at once."""
    opener = gzip.open if path.name.endswith(".gz") else open
    seen = False
    try:
        with opener(path, "rb") as f:
            for lineno, raw in enumerate(f, start=1):
                seen = seen or bool(raw.strip())
                where = f"{path}:{lineno}"
                if b"\x00" in raw:
                    raise DataError("binary data (NUL bytes), not JSON Lines text", where=where,
                                    fix=f"point at a text data file ({_FORMATS})")  # fmt: skip
                line, error = _decode(raw, where, first=lineno == 1)
                if error is None and not line.strip():
                    continue
                if error is None:
                    try:
                        yield json.loads(line), where, None
                        continue
                    except json.JSONDecodeError as e:
                        error = DataError(f"invalid JSON: {e.msg} (column {e.colno})", where=where,
                                          fix="each line must be one complete JSON object")  # fmt: skip
                yield line[:200], where, error
    except (gzip.BadGzipFile, EOFError, zlib.error) as e:
        raise DataError(f"corrupt or truncated gzip file ({e})", where=str(path),
                        fix="re-create the .gz file, or decompress it and point at the .jsonl") from None  # fmt: skip
    if not seen:
        raise DataError("data file is empty" + (" (0 bytes)" if path.stat().st_size == 0 else ""), where=str(path),
                        fix="point at a file with at least one record (was it written completely?)")  # fmt: skip


def _decode(raw: bytes, where: str, first: bool) -> tuple[str, DataError | None]:
    """A line's text (a UTF-8 byte-order mark on the first line dropped), or its DataError."""
    try:
        return raw.decode("utf-8-sig" if first else "utf-8"), None
    except UnicodeDecodeError as e:
        error = DataError(
            f"bytes that are not UTF-8 text (byte 0x{raw[e.start]:02x} at column {e.start + 1})",
            where=where,
            fix="re-encode the file as UTF-8 (e.g. iconv -f latin1 -t utf-8 IN > OUT)",
        )
        return raw.decode("utf-8", errors="replace"), error


def _iter_jsonl(path: Path) -> Iterator[tuple[dict, str]]:
    for row, where, error in jsonl_lines(path):
        if error is not None:
            raise error
        yield row, where


def _iter_json(path: Path) -> Iterator[tuple[dict, str]]:
    raw = path.read_bytes()
    if b"\x00" in raw:
        raise DataError("binary data (NUL bytes), not JSON text", where=str(path), fix=f"use {_FORMATS}")
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = raw[: e.start].count(b"\n") + 1
        raise DataError(f"bytes that are not UTF-8 text (byte 0x{raw[e.start]:02x})", where=f"{path}:{line}",
                        fix="re-encode the file as UTF-8 (e.g. iconv -f latin1 -t utf-8 IN > OUT)") from None  # fmt: skip
    if not text.strip():
        return
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise DataError(
            f"invalid JSON: {e.msg}", where=f"{path}:{e.lineno}", fix="fix the JSON syntax"
        ) from None
    if isinstance(data, dict) and isinstance(data.get("data"), list):
        data = data["data"]
    if not isinstance(data, list):
        raise DataError(
            f"expected a JSON list of records or {{'data': [...]}}, got {type(data).__name__}",
            where=str(path),
            fix="wrap the records in a list, or use JSONL (one record per line)",
        )
    for i, row in enumerate(data):
        yield row, f"{path}:row {i}"


def _iter_parquet(path: Path) -> Iterator[tuple[dict, str]]:
    import pyarrow.parquet as pq

    try:
        parquet = pq.ParquetFile(path)
    except Exception as e:  # pyarrow raises several types for a corrupt file
        raise DataError(f"cannot read Parquet file: {e}", where=str(path)) from None
    i = 0
    # Batches keep memory flat and let `limit` stop early on large files.
    for batch in parquet.iter_batches(batch_size=1024):
        for row in batch.to_pylist():
            yield row, f"{path}:row {i}"
            i += 1


def _iter_dataset_dir(path: Path, split: str) -> Iterator[tuple[dict, str]]:
    import datasets

    try:
        ds = datasets.load_from_disk(str(path))
    except FileNotFoundError:
        raise DataError(
            f"{path} is a folder but not a dataset saved with save_to_disk",
            where=str(path),
            fix=f"point at a data file ({_FORMATS})",
        ) from None
    if isinstance(ds, datasets.DatasetDict):
        if split not in ds:
            raise DataError(
                f"split {split!r} not found; the dataset has {sorted(ds)}",
                where=str(path),
                fix="set split to one of those",
            )
        ds = ds[split]
    for i, row in enumerate(ds):
        yield row, f"{path}[{split}]:row {i}"


def write_jsonl(path: str | Path, rows: Iterable[dict]) -> int:
    """Write ``rows`` as JSONL atomically (temp file in the same folder, then ``os.replace``).

    Returns the number of rows written. A crash mid-write leaves any old file intact.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    n = 0
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            for row in rows:
                f.write(json.dumps(row, ensure_ascii=False) + "\n")
                n += 1
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return n
