"""A replay buffer on disk that later training stages read: append-only JSONL, deduplicated.

One line per entry: ``{"id", "seq", "kind", "priority", "time", "source", "record"}``,
where ``record`` is a training record (``sft``, ``prm``, ``preference``, ``value``) or a
whole search result (``trace``: trace-based supervision). ``id`` is a hash of kind +
record, so the same record is stored once, across restarts too.

Crash safety: every `add` appends whole lines, then flushes and fsyncs. A crash mid-write
can only leave a partial last line; opening the buffer drops it (truncating the file back
to the last complete line) and counts it in ``recovered``. Other unreadable lines are
skipped and counted in ``skipped``. One writer at a time.

Sampling (`sample`): ``uniform``; ``recency`` -- weight ``0.5 ** (age / half_life)``, age in
entries; ``priority`` -- weight ``priority ** alpha``. Weighted draws without replacement
use Efraimidis-Spirakis keys ``u ** (1 / w)``; a seed makes them reproducible.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import time
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any, Literal

from posttrain.errors import ConfigError

KINDS = ("sft", "prm", "preference", "value", "trace")


def record_id(kind: str, record: dict[str, Any]) -> str:
    body = json.dumps([kind, record], sort_keys=True, ensure_ascii=False)
    return hashlib.sha256(body.encode("utf-8")).hexdigest()[:24]


class ReplayBuffer:
    """Append-only JSONL replay buffer with dedup and recency / priority sampling."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.entries: list[dict[str, Any]] = []
        self.ids: set[str] = set()
        self.recovered = 0
        self.skipped = 0
        self._load()

    def _load(self) -> None:
        if not self.path.exists():
            self.path.parent.mkdir(parents=True, exist_ok=True)
            return
        data = self.path.read_bytes()
        good_end = 0
        for line in data.splitlines(keepends=True):
            complete = line.endswith(b"\n")
            try:
                entry = json.loads(line)
                if not complete:
                    raise ValueError("partial line")
            except ValueError:
                if complete:
                    self.skipped += 1
                    good_end += len(line)
                    continue
                self.recovered += 1  # a partial last line: a write cut short by a crash
                break
            good_end += len(line)
            if entry.get("id") not in self.ids:
                self.ids.add(entry["id"])
                self.entries.append(entry)
        if good_end < len(data):
            with self.path.open("r+b") as f:
                f.truncate(good_end)

    def __len__(self) -> int:
        return len(self.entries)

    def add(
        self,
        records: Iterable[dict[str, Any]],
        kind: str,
        priority: float | Sequence[float] = 1.0,
        source: str = "",
    ) -> int:
        """Append new ``records`` of ``kind`` (duplicates are skipped); returns how many were added."""
        if kind not in KINDS:
            raise ConfigError(
                f"unknown replay kind {kind!r}", where="replay.kind", fix=f"use one of {', '.join(KINDS)}"
            )
        records = list(records)
        prios = [float(priority)] * len(records) if isinstance(priority, int | float) else list(priority)
        if len(prios) != len(records):
            raise ConfigError(f"{len(prios)} priorities for {len(records)} records", where="replay.priority")
        lines, now = [], time.time()
        for rec, prio in zip(records, prios, strict=True):
            rid = record_id(kind, rec)
            if rid in self.ids:
                continue
            entry = {"id": rid, "seq": len(self.entries), "kind": kind, "priority": prio, "time": now,
                     "source": source, "record": rec}  # fmt: skip
            self.ids.add(rid)
            self.entries.append(entry)
            lines.append(json.dumps(entry, ensure_ascii=False) + "\n")
        if lines:
            with self.path.open("a", encoding="utf-8") as f:
                f.write("".join(lines))
                f.flush()
                os.fsync(f.fileno())
        return len(lines)

    def add_results(
        self, results: Sequence[Any], step_sep: str = "<step>", min_reward: float | None = 1.0
    ) -> dict[str, int]:
        """Store search results: their traces and every export (SFT, PRM, preference, value)."""
        from posttrain.search.export import export_preferences, export_prm, export_sft, export_values

        source = ",".join(sorted({r.strategy for r in results}))
        return {
            "trace": self.add([r.to_dict() for r in results], "trace", source=source),
            "sft": self.add(export_sft(results, min_reward), "sft", source=source),
            "prm": self.add(export_prm(results, step_sep), "prm", source=source),
            "preference": self.add(export_preferences(results), "preference", source=source),
            "value": self.add(export_values(results), "value", source=source),
        }

    def records(self, kind: str | None = None) -> list[dict[str, Any]]:
        """All stored records (of ``kind``), oldest first."""
        return [e["record"] for e in self.entries if kind is None or e["kind"] == kind]

    def sample(
        self,
        k: int,
        kind: str | None = None,
        by: Literal["uniform", "recency", "priority"] = "uniform",
        seed: int | None = None,
        half_life: float | None = None,
        alpha: float = 1.0,
    ) -> list[dict[str, Any]]:
        """Up to ``k`` records drawn without replacement (see the module docstring)."""
        pool = [e for e in self.entries if kind is None or e["kind"] == kind]
        rng = random.Random(seed)
        if by == "uniform":
            return [e["record"] for e in rng.sample(pool, min(k, len(pool)))]
        if by == "recency":
            newest = max((e["seq"] for e in pool), default=0)
            hl = half_life or max(1.0, len(pool) / 4)
            weights = [0.5 ** ((newest - e["seq"]) / hl) for e in pool]
        elif by == "priority":
            weights = [max(e["priority"], 0.0) ** alpha for e in pool]
        else:
            raise ConfigError(
                f"unknown sampling {by!r}", where="replay.sample", fix="uniform, recency or priority"
            )
        keyed = [(rng.random() ** (1.0 / w), i) for i, w in enumerate(weights) if w > 0]
        keyed.sort(reverse=True)
        return [pool[i]["record"] for _, i in keyed[:k]]
