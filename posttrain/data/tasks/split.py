"""Deterministic, disjoint train/test splits of a generated task.

A question belongs to the test split iff a stable hash of its text (SHA-256,
not Python's salted ``hash``) falls below the level's `Task.test_fraction`.
The partition depends on the question text alone, so train and test are
disjoint for every seed, size and task variant that can write the same
question. Each (task, split, level, seed) draws from its own random stream,
so the test split is the same across runs and whatever the train size, and a
smaller split is a prefix of a larger one.
"""

from __future__ import annotations

import hashlib
import random
import re
from collections.abc import Iterable, Sequence
from typing import Literal

from posttrain.data.tasks.base import Problem, Task
from posttrain.data.tasks.registry import TASKS, get_task
from posttrain.errors import ConfigError

Split = Literal["train", "test"]
_WORD_END = re.compile(r"\S+")


def _hash64(text: str) -> int:
    return int.from_bytes(hashlib.sha256(text.encode("utf-8")).digest()[:8], "big")


def in_test(question: str, fraction: float) -> bool:
    """Whether ``question`` is held out for test, given the test share of its level."""
    return _hash64(question) < fraction * 2**64


def held_out_fraction(question: str, tasks: Iterable[Task] | None = None) -> float:
    """The largest test share among the (task, level) pairs that can write ``question``; 0 if none can.

    ``tasks`` defaults to every registered task. A question held out by any task that can
    write it must stay out of every training corpus, whichever task generated it there."""
    tasks = TASKS.values() if tasks is None else tasks
    return max((t.test_fraction(lv) for t in tasks for lv in t.question_levels(question)), default=0.0)


def in_any_test(question: str, tasks: Iterable[Task] | None = None) -> bool:
    """Whether ``question`` is in the test split of some (task, level) that can write it."""
    return in_test(question, held_out_fraction(question, tasks))


def find_test_question(text: str, tasks: Iterable[Task] | None = None) -> tuple[str, str, int] | None:
    """The first test-split question that begins a line of ``text``, as ``(question, task, level)``; else None.

    Each line (stripped) is tried at every prefix that ends before a space, and whole: ``Compute 8 +
    16 + 5`` begins ``Compute 8 + 16 + 5 + 11``, whose chain of thought computes the shorter question's
    answer on the way. Membership is the hash partition itself, so every question of the split counts,
    not a sample of them. A question in the middle of a line is found only by decontamination's n-gram
    match (`posttrain.data.quality.decontam`)."""
    tasks = list(TASKS.values()) if tasks is None else list(tasks)
    for line in text.splitlines():
        line = line.strip()
        for end in (m.end() for m in _WORD_END.finditer(line)):
            question = line[:end]
            for task in tasks:
                for level in task.question_levels(question):
                    if in_test(question, task.test_fraction(level)):
                        return question, task.name, level
    return None


def _stream(task: str, split: str, level: int, seed: int) -> random.Random:
    return random.Random(_hash64(f"{task}|{split}|{level}|{seed}"))


def _draw_level(task: Task, split: Split, level: int, n: int, seed: int, unique: bool) -> list[Problem]:
    """Generate until ``n`` problems of this split are found; give up after a bounded number of draws."""
    rng = _stream(task.name, split, level, seed)
    fraction, want_test = task.test_fraction(level), split == "test"
    max_draws = 50 * n + 5000
    seen: set[str] = set()
    out: list[Problem] = []
    for _ in range(max_draws):
        if len(out) == n:
            return out
        problem = task.generate(rng, level)
        if in_test(problem.question, fraction) != want_test or (unique and problem.question in seen):
            continue
        seen.add(problem.question)
        out.append(problem)
    if len(out) == n:
        return out
    raise ConfigError(
        f"task {task.name!r} level {level} has too few distinct {split} questions: "
        f"found {len(out)} of the {n} asked in {max_draws} draws",
        where="n_per_level",
        fix=f"ask for at most about {len(out)} per level at level {level}, or leave this level out",
    )


def make_split(
    task: str | Task,
    split: Split,
    n_per_level: int,
    seed: int = 0,
    levels: Sequence[int] | None = None,
    *,
    unique: bool | None = None,
) -> list[Problem]:
    """``n_per_level`` problems of each level (all levels by default), grouped by level in order.

    ``unique`` (default: True for test, False for train) forbids repeated
    questions; the train split may repeat questions because easy levels have
    only a few hundred. Shuffle the result yourself if levels should mix.
    """
    task = get_task(task) if isinstance(task, str) else task
    if split not in ("train", "test"):
        raise ConfigError(f"unknown split {split!r}", where="split", fix="use 'train' or 'test'")
    if isinstance(n_per_level, bool) or not isinstance(n_per_level, int) or n_per_level < 0:
        raise ConfigError(f"n_per_level must be an int >= 0, got {n_per_level!r}", where="n_per_level")
    chosen = tuple(task.levels if levels is None else levels)
    for level in chosen:
        task.check_level(level)
    unique = split == "test" if unique is None else unique
    out: list[Problem] = []
    for level in chosen:
        out += _draw_level(task, split, level, n_per_level, seed, unique)
    return out


def task_problems(
    tasks: Sequence[str], split: Split, n_per_level: int, seed: int = 0, levels: Sequence[int] | None = None
) -> list[Problem]:
    """`make_split` over several tasks, in order; ``levels`` keeps, per task, the levels it has.

    A requested level that none of the tasks has is a ConfigError (a typo would otherwise
    select nothing silently)."""
    out: list[Problem] = []
    known: set[int] = set()
    for name in tasks:
        own = get_task(name).levels
        known.update(own)
        chosen = None if levels is None else [lv for lv in levels if lv in own]
        out += make_split(name, split, n_per_level, seed=seed, levels=chosen)
    if levels is not None and (missing := sorted(set(levels) - known)):
        raise ConfigError(
            f"no task of {list(tasks)} has level(s) {missing}",
            where="levels",
            fix=f"use levels among {sorted(known)}",
        )
    return out
