"""A generated training corpus on disk, with a manifest anyone can audit against the test split.

`write_corpus` stores the documents as ``corpus.jsonl.gz`` (one record per document: task,
level, question, text) beside ``corpus_manifest.json`` (the generating config and seed, the
SHA-256 of the uncompressed JSONL, counts per task and level, and how many drawn
documents decontamination dropped). `audit_corpus` re-reads both, checks they agree, and counts
the documents whose question is in some task's test split (`split.in_any_test`) and those a line
of which begins with a test question (`split.find_test_question`): both zero for a decontaminated corpus.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import os
from collections import Counter
from pathlib import Path
from typing import Any

from posttrain.data.tasks.registry import TASKS
from posttrain.data.tasks.split import find_test_question, in_any_test
from posttrain.errors import DataError

CORPUS_FILE = "corpus.jsonl.gz"
MANIFEST_FILE = "corpus_manifest.json"


def _jsonl(records: list[dict]) -> bytes:
    return "".join(json.dumps(r, sort_keys=True) + "\n" for r in records).encode("utf-8")


def _atomic_write(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def _counts(records: list[dict]) -> dict[str, int]:
    return dict(sorted(Counter(f"{r['task']}/L{r['level']}" for r in records).items()))


def write_corpus(
    folder: str | os.PathLike, records: list[dict], config: Any, seed: int, removed: dict[str, int]
) -> Path:
    """Write ``corpus.jsonl.gz`` and ``corpus_manifest.json`` into ``folder``; returns the manifest.

    ``config`` is the generating config (a dataclass or dict, stored as JSON); ``removed`` counts the
    distinct drawn documents decontamination dropped, by what matched."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    body = _jsonl(records)
    _atomic_write(folder / CORPUS_FILE, gzip.compress(body, mtime=0))
    cfg = config if isinstance(config, dict) else dict(vars(config))
    manifest = {
        "config": cfg,
        "seed": seed,
        "n_docs": len(records),
        "sha256": hashlib.sha256(body).hexdigest(),
        "docs_per_task_level": _counts(records),
        "removed": {"contaminated": sum(removed.values()), "by_match": removed},
        "held_out_by": {t.name: {lv: t.test_fraction(lv) for lv in t.levels} for t in TASKS.values()},
        "rule": "data clean's decontamination against every registered task's test split "
        "(posttrain.data.quality.decontam, whole_split): a document is dropped if a line of it is, or "
        "begins with, a question of the split (data.tasks.split), or holds a sampled test question's n-gram",
    }
    _atomic_write(folder / MANIFEST_FILE, (json.dumps(manifest, indent=1) + "\n").encode())
    return folder / MANIFEST_FILE


def read_corpus(folder: str | os.PathLike) -> tuple[list[dict], dict]:
    """The records and the manifest; a missing file or a body that does not match is a `DataError`."""
    folder = Path(folder)
    for name in (CORPUS_FILE, MANIFEST_FILE):
        if not (folder / name).is_file():
            raise DataError(
                f"no {name} in {folder}", where=str(folder), fix="rebuild the model with posttrain pretrain"
            )
    manifest = json.loads((folder / MANIFEST_FILE).read_text())
    body = gzip.decompress((folder / CORPUS_FILE).read_bytes())
    if hashlib.sha256(body).hexdigest() != manifest.get("sha256"):
        raise DataError(
            f"{folder / CORPUS_FILE} does not match the sha256 in its manifest",
            where=str(folder / MANIFEST_FILE),
            fix="the corpus was altered: rebuild it with posttrain pretrain force=true",
        )
    records = [json.loads(line) for line in body.decode("utf-8").splitlines()]
    if len(records) != manifest.get("n_docs") or _counts(records) != manifest.get("docs_per_task_level"):
        raise DataError(f"{folder / MANIFEST_FILE} counts do not match the corpus", where=str(folder))
    return records, manifest


def audit_corpus(folder: str | os.PathLike) -> dict[str, int]:
    """Check corpus against manifest; count documents, the distinct test questions among their
    questions, and the documents a line of which is or begins with a test question."""
    records, _ = read_corpus(folder)
    questions = {r["question"] for r in records}
    return {
        "docs": len(records),
        "questions": len(questions),
        "test_questions": sum(in_any_test(q) for q in questions),
        "docs_with_test_question": sum(find_test_question(r["text"]) is not None for r in records),
    }
