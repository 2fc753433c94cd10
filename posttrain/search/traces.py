"""Search traces on disk: one `SearchResult` (structure, trace, cost, outcome) per JSONL line.

A result line holds the whole graph -- every node with its text, token ids, visits,
values, scores and rewards -- and the operator trace, so a search can be reloaded exactly,
exported to training data later, or stored in the replay buffer as trace-based supervision.
Writes go to a temporary file then an atomic rename, so a crash never leaves half a file.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from posttrain.errors import DataError
from posttrain.search.base import SearchResult
from posttrain.search.budget import Cost, total_cost


def save_results(path: str | Path, results: Iterable[SearchResult]) -> Path:
    """Write ``results`` as JSONL (atomically); returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    with tmp.open("w", encoding="utf-8") as f:
        for r in results:
            f.write(json.dumps(r.to_dict(), ensure_ascii=False) + "\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    return path


def load_results(path: str | Path) -> list[SearchResult]:
    """Read results written by `save_results`; a malformed line is a DataError naming it."""
    path = Path(path)
    out = []
    for i, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            out.append(SearchResult.from_dict(json.loads(line)))
        except (json.JSONDecodeError, KeyError, TypeError) as exc:
            raise DataError(f"not a search result: {exc}", where=f"{path}:{i}") from None
    return out


def summarize(results: list[SearchResult]) -> dict[str, Any]:
    """Totals over a batch: cost (summed per prompt), answers found, operators applied."""
    ops: dict[str, int] = {}
    for r in results:
        for e in r.graph.trace:
            ops[e.op] = ops.get(e.op, 0) + 1
    cost = total_cost([r.cost if isinstance(r.cost, Cost) else Cost.from_dict(r.cost) for r in results])
    return {
        "prompts": len(results),
        "answered": sum(r.answer is not None for r in results),
        "cost": cost.to_dict(),
        "operators": ops,
    }
