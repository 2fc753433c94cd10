"""Decontamination: drop training records that contain an eval question.

Eval sets are data files of any kind the data layer reads (the question of an eval record
is its prompt's user text, or a chat's first user turn) or the task suite's test split
(``tasks`` for every task, ``task:NAME`` for one; `task_problems` with ``task_n_per_level``
problems per level and ``task_seed``, as the evals draw them).

Text is normalised as for exact dedup (NFKC, casefold) and cut into tokens: runs of
letters/digits, and every other non-space character alone (so ``11 + 16`` and ``11 - 16``
differ). A record is ``contaminated`` when

- its whole text contains a run of n tokens equal to n consecutive tokens of an eval
  question, with n = ``ngram`` (13) for long questions and n = the question's own length
  for shorter ones (the whole question must appear), down to ``min_ngram`` tokens;
- or (``exact_question``) its question equals an eval question, whatever their length;
- or (``whole_split``, for the task suite) a line of its raw text is, or begins with, a question of
  a task's test split: membership by the split's hash partition (`split.find_test_question`), so it
  covers every question of the split, not only the ``task_n_per_level`` sampled ones.

Questions shorter than ``min_ngram`` tokens are matched only as exact questions, so short
common phrases ("what is the") never remove a record. The evidence names the eval item
(its file:line, or task, split and level) and the matched text.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from posttrain.data.quality.items import Item, normalize_text, question_text, read_source
from posttrain.data.tasks.split import find_test_question
from posttrain.errors import ConfigError, DataError

_TOKEN_RE = re.compile(r"\w+|[^\w\s]")


@dataclass
class DecontamConfig:
    """Eval sets to decontaminate against (none: the step is off)."""

    evals: list[str] = field(default_factory=list)
    """Eval data files (JSONL, JSON, Parquet, HF folder), or ``tasks`` / ``task:NAME`` for the task suite's test split."""
    ngram: int = 13
    """Tokens of the overlap that marks a record as contaminated (shorter questions use their length)."""
    min_ngram: int = 5
    """Questions with fewer tokens are matched only as exact questions."""
    exact_question: bool = True
    """Also drop a record whose question equals an eval question (after normalisation)."""
    split: str = "test"
    """Split read from eval folders saved with datasets' save_to_disk."""
    task_n_per_level: int = 50
    """Test problems per task level for ``tasks`` / ``task:NAME``."""
    task_seed: int = 0
    """Seed of the task suite's test problems."""
    whole_split: bool = True
    """For ``tasks`` / ``task:NAME``: also drop a record a line of which is, or begins with, any
    question of the test split (hash membership, `data.tasks.split.find_test_question`), sampled or not."""

    def validate(self) -> None:
        if not 1 <= self.min_ngram <= self.ngram:
            raise ConfigError(
                "decontam needs 1 <= min_ngram <= ngram",
                where="decontam.min_ngram",
                fix="e.g. ngram=13 min_ngram=5",
            )


def tokens(text: str) -> list[str]:
    """Decontamination tokens of ``text`` (normalised, punctuation kept as separate tokens)."""
    return _TOKEN_RE.findall(normalize_text(text))


def eval_questions(spec: str, cfg: DecontamConfig, key: str = "decontam.evals") -> Iterator[tuple[str, str]]:
    """``(where, question)`` for every item of one eval set."""
    if spec == "tasks" or spec.startswith("task:"):
        from posttrain.data.tasks import TASKS, task_problems

        names = sorted(TASKS) if spec == "tasks" else [spec.split(":", 1)[1]]
        unknown = [n for n in names if n not in TASKS]
        if unknown:
            raise ConfigError(
                f"unknown task {unknown[0]!r}",
                where=key,
                fix=f"use tasks or task:NAME with NAME in {sorted(TASKS)}",
            )
        for i, p in enumerate(task_problems(names, "test", cfg.task_n_per_level, seed=cfg.task_seed)):
            yield f"task {p.task} test level {p.level} #{i}", p.question
        return
    if not Path(spec).exists():
        raise DataError(
            f"eval set not found: {spec}", where=key, fix="give a data file, 'tasks' or 'task:NAME'"
        )
    for item in read_source(spec, split=cfg.split, on_invalid="stop"):
        question = question_text(item.data, item.kind)
        if not question.strip():
            raise DataError(
                "eval item has no question (no user text)",
                where=item.where,
                fix="eval records need a user prompt",
            )
        yield item.where, question


class DecontamIndex:
    """Eval questions by their n-grams (one table per n) and by their normalised text."""

    def __init__(self, cfg: DecontamConfig):
        self.cfg = cfg
        self.items: list[tuple[str, str]] = []
        self.tables: dict[int, dict[tuple[str, ...], int]] = {}
        self.firsts: dict[int, set[str]] = {}
        self.exact: dict[str, int] = {}
        self.split_tasks: dict[str, object] = {}
        """Tasks whose whole test split is checked (``whole_split``), by name."""

    def add(self, where: str, question: str) -> None:
        idx = len(self.items)
        self.items.append((where, question))
        if self.cfg.exact_question:
            self.exact.setdefault(normalize_text(question), idx)
        toks = tokens(question)
        n = min(self.cfg.ngram, len(toks))
        if n < self.cfg.min_ngram:
            return
        table = self.tables.setdefault(n, {})
        firsts = self.firsts.setdefault(n, set())
        for i in range(len(toks) - n + 1):
            table.setdefault(tuple(toks[i : i + n]), idx)
            firsts.add(toks[i])

    def _evidence(self, idx: int, match: str, text: str) -> dict:
        where, question = self.items[idx]
        return {"eval": where, "question": question[:300], "match": match, "text": text[:300]}

    def find(
        self, text: str, question: str = "", normalized: bool = False, raw: str | None = None
    ) -> dict | None:
        """Evidence of the first eval item found in ``text`` (or equal to ``question``), else None.
        ``normalized``: ``text`` is already `normalize_text`'d, and ``raw`` is the text before that
        (the whole-split check reads questions as the tasks write them)."""
        if self.exact and question and (idx := self.exact.get(normalize_text(question))) is not None:
            return self._evidence(idx, "exact question", question)
        raw = text if raw is None and not normalized else raw
        if self.split_tasks and raw and (hit := find_test_question(raw, self.split_tasks.values())):
            q, task, level = hit
            line = next(ln for ln in raw.splitlines() if ln.strip().startswith(q))
            return {
                "eval": f"task {task} test level {level}",
                "question": q,
                "match": "test split",
                "text": line[:300],
            }
        toks = _TOKEN_RE.findall(text if normalized else normalize_text(text))
        for n, table in self.tables.items():
            firsts = self.firsts[n]
            for i in range(len(toks) - n + 1):
                if toks[i] in firsts and (idx := table.get(tuple(toks[i : i + n]))) is not None:
                    return self._evidence(idx, f"{n}-gram", " ".join(toks[i : i + n]))
        return None


def build_index(cfg: DecontamConfig) -> DecontamIndex:
    """Index every question of every eval set in ``cfg.evals``."""
    index = DecontamIndex(cfg)
    for i, spec in enumerate(cfg.evals):
        for where, question in eval_questions(spec, cfg, key=f"decontam.evals[{i}]"):
            index.add(where, question)
        if cfg.whole_split and (spec == "tasks" or spec.startswith("task:")):
            from posttrain.data.tasks import TASKS

            names = sorted(TASKS) if spec == "tasks" else [spec.split(":", 1)[1]]
            index.split_tasks.update({n: TASKS[n] for n in names})
    return index


def decontaminate(items: Iterable[Item], index: DecontamIndex) -> Iterator[Item]:
    """Drop items whose text contains an eval question's n-gram or whose question is an eval question."""
    for item in items:
        if item.removed is None:
            pre = item.pre or {}
            found = (
                pre["contaminated"]
                if "contaminated" in pre
                else index.find(
                    item.norm, question_text(item.data, item.kind), normalized=True, raw=item.text
                )
            )
            if found is not None:
                item.drop("contaminated", **found)
        yield item
