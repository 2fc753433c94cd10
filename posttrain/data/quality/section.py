"""A training recipe's ``clean:`` section: clean the training file before training, cached.

SFT (``data.train``), preference (``data.train``) and RL (``data.prompts``) recipes may hold

    clean:
      dedup: {threshold: 0.85}
      decontam: {evals: [tasks]}

with any step key of `posttrain data clean` (`CleanSteps`: filters, verify, dedup, decontam,
perplexity, judge, ...). `clean_data` runs those steps on the recipe's training file and
hands the trainer a copy of its data config pointing at the cleaned ``kept.jsonl``.

Cache: ``CACHE/<key>/`` (the whole `run_clean` output: kept, removed, flags, report), with
``CACHE`` = ``cache_dir`` or ``RUN_DIR/clean`` and ``key`` the SHA-256 of the training file's
bytes (every file of a folder), the bytes of every decontamination eval file, and the clean
settings. A rerun with the same data and settings reads the cached kept.jsonl; a changed file or
setting cleans into a new key. The task suite (``tasks``) is generated, not read: it is never
cleaned here (a `ConfigError`; clean a written copy instead).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from posttrain.config import to_dict
from posttrain.data.quality.clean import CleanRecipe, CleanSteps, report_table, run_clean
from posttrain.errors import ConfigError

log = logging.getLogger(__name__)


@dataclass
class CleanSection(CleanSteps):
    """``clean:`` of a training recipe: the steps of `posttrain data clean` run on its training file."""

    cache_dir: str = ""
    """Where cleaned copies are kept, one folder per key (empty: RUN_DIR/clean)."""


def _hash_path(h: Any, path: Path) -> None:
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    for f in files:
        h.update(str(f.relative_to(path) if path.is_dir() else f.name).encode())
        with open(f, "rb") as stream:
            for block in iter(lambda: stream.read(1 << 20), b""):
                h.update(block)


def cache_key(path: str, section: CleanSection) -> str:
    """SHA-256 (16 hex) of the training file, the eval files and the settings (module docstring)."""
    h = hashlib.sha256()
    _hash_path(h, Path(path))
    for spec in section.decontam.evals:
        h.update(spec.encode())
        if Path(spec).exists():
            _hash_path(h, Path(spec))
    settings = {k: v for k, v in to_dict(section).items() if k != "cache_dir"}
    h.update(json.dumps(settings, sort_keys=True).encode())
    return h.hexdigest()[:16]


def clean_file(section: CleanSection, path: str, cache_dir: Path, key_name: str = "data.train") -> Path:
    """The cleaned ``kept.jsonl`` of ``path`` (cleaned now, or read from the cache)."""
    if path == "tasks" or not Path(path).exists():
        raise ConfigError(
            f"clean: needs a data file, {key_name} is {path!r}",
            where=key_name,
            fix="point it at a JSONL/JSON/Parquet file, or remove the clean: section",
        )
    out = cache_dir / cache_key(path, section)
    if not (out / "report.json").is_file():
        steps = {f.name: getattr(section, f.name) for f in dataclasses.fields(CleanSteps)}
        run_clean(CleanRecipe(inputs=[path], output_dir=str(out), **steps))
    else:
        log.info("clean: reusing %s", out)
        from rich.console import Console

        report = json.loads((out / "report.json").read_text())
        Console().print(report_table(report, title=f"clean: {path} (cached in {out})"))
    return out / "kept.jsonl"


def clean_data(section: CleanSection | None, data: Any, key: str, output_dir: str) -> Any:
    """``data`` (a data config) with its ``key`` field pointed at the cleaned file; ``data``
    itself when there is no ``clean:`` section."""
    if section is None:
        return data
    try:
        section.validate_steps()
    except ConfigError as exc:
        exc.where = f"clean.{exc.where}" if exc.where else "clean"
        raise
    cache = Path(section.cache_dir) if section.cache_dir else Path(output_dir) / "clean"
    kept = clean_file(section, getattr(data, key), cache, key_name=f"data.{key}")
    return dataclasses.replace(data, **{key: str(kept)})
