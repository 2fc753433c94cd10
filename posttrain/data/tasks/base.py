"""The problem record and the task interface shared by every synthetic task.

A task generates `Problem`s (question, chain-of-thought steps, final answer) at
graded difficulty levels, and knows how to judge model output three ways:
`Task.verify` checks a final answer (the RL reward), `Task.check_steps` labels
each step of a chain (process reward labels), and `Task.corrupt` writes a
plausible wrong chain (negatives for reward models and preference pairs).

Response format, shared by SFT targets and the answer extractor::

    <think>11 + 16 = 27
    27 + 0 = 27
    27 + 14 = 41</think>
    Answer: 41
"""

from __future__ import annotations

import random
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from posttrain.errors import ConfigError, DataError

ANSWER_MARKER = "Answer:"
THINK_OPEN = "<think>"
THINK_CLOSE = "</think>"

# Share of distinct questions held out for test, by hash of the question text.
# The easiest level has few distinct questions, so it holds out more of them.
TEST_FRACTION = 0.2
TEST_FRACTION_EASIEST = 0.5


@dataclass(frozen=True)
class Problem:
    """One generated problem with its reference chain of thought and answer."""

    task: str
    level: int
    question: str
    steps: tuple[str, ...]
    answer: str

    def reasoning(self, step_sep: str = "\n") -> str:
        """The chain of thought: the steps joined by ``step_sep``."""
        return step_sep.join(self.steps)

    def final(self) -> str:
        """The final-answer line, ``"Answer: <answer>"``."""
        return f"{ANSWER_MARKER} {self.answer}"

    def response(self, step_sep: str = "\n", think: bool = True) -> str:
        """The assistant text: ``<think>steps</think>\\nAnswer: x``, or only the answer line."""
        if not think:
            return self.final()
        return f"{THINK_OPEN}{self.reasoning(step_sep)}{THINK_CLOSE}\n{self.final()}"

    def messages(self, step_sep: str = "\n") -> list[dict[str, str]]:
        """A two-turn chat; the chain goes in ``reasoning_content`` for thinking templates."""
        return [
            {"role": "user", "content": self.question},
            {"role": "assistant", "reasoning_content": self.reasoning(step_sep), "content": self.final()},
        ]

    def prompt_record(self) -> dict[str, Any]:
        """An RL prompt record whose metadata names this task as the scorer."""
        return {
            "prompt": [{"role": "user", "content": self.question}],
            "metadata": {
                "scorer": self.task,
                "ground_truth": self.answer,
                "level": self.level,
                "task": self.task,
            },
        }

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict (steps as a list)."""
        return {
            "task": self.task,
            "level": self.level,
            "question": self.question,
            "steps": list(self.steps),
            "answer": self.answer,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Problem:
        """Inverse of `to_dict`; a missing or mistyped field is a `DataError`."""
        fields = {"task": str, "level": int, "question": str, "steps": list | tuple, "answer": str}
        for key, kind in fields.items():
            if key not in d:
                raise DataError(
                    f"problem record has no {key!r}", where=key, fix="write it with Problem.to_dict"
                )
            if not isinstance(d[key], kind) or isinstance(d[key], bool):
                raise DataError(f"{key!r} has type {type(d[key]).__name__}", where=key)
        if not all(isinstance(s, str) for s in d["steps"]):
            raise DataError("every step must be a string", where="steps")
        return cls(d["task"], d["level"], d["question"], tuple(d["steps"]), d["answer"])


def extract_answer(completion: str) -> str | None:
    """The final answer in a model completion, or None.

    Only text after the last ``</think>`` counts; a ``<think>`` that is never
    closed means the model is still thinking (None). Within that text, take
    the first line after the last ``Answer:``, strip whitespace and one
    trailing period. The marker is case-sensitive.
    """
    tail = completion
    if THINK_CLOSE in completion:
        tail = completion.rsplit(THINK_CLOSE, 1)[1]
    elif THINK_OPEN in completion:
        return None
    if ANSWER_MARKER not in tail:
        return None
    text = tail.rsplit(ANSWER_MARKER, 1)[1].strip()
    text = text.splitlines()[0].strip() if text else ""
    text = text.removesuffix(".").strip()
    return text or None


def split_steps(completion: str, step_sep: str = "\n") -> list[str]:
    """The chain-of-thought steps written in a completion (non-empty, stripped).

    The chain is the text after ``<think>`` up to ``</think>`` (or the end); with
    no ``<think>``, the text before the last ``Answer:``.
    """
    if THINK_OPEN in completion:
        body = completion.split(THINK_OPEN, 1)[1].split(THINK_CLOSE, 1)[0]
    else:
        body = completion.rsplit(ANSWER_MARKER, 1)[0] if ANSWER_MARKER in completion else completion
    return [s.strip() for s in body.split(step_sep) if s.strip()]


def labels_until_error(steps: Sequence[str], accept: Callable[[str], bool]) -> list[bool]:
    """Per-step labels: True up to the first step ``accept`` rejects, False from there on.

    ``accept`` is a stateful checker that advances its state on every step it
    accepts. Steps after an error are False because they build on a wrong
    state (the PRM convention: a chain is only as good as its first error).
    """
    labels: list[bool] = []
    for step in steps:
        if not accept(step):
            break
        labels.append(True)
    return labels + [False] * (len(steps) - len(labels))


class Task(ABC):
    """A family of generated problems with a verifier, a step checker and a corrupter.

    Subclasses set ``name``, ``levels`` (1 = easiest) and ``description``.
    """

    name: str
    levels: tuple[int, ...]
    description: str

    @abstractmethod
    def generate(self, rng: random.Random, level: int) -> Problem:
        """A random problem at ``level``, using only ``rng`` for randomness."""

    @abstractmethod
    def verify(self, completion: str, ground_truth: str) -> bool:
        """Whether the completion's final answer (`extract_answer`) is correct."""

    @abstractmethod
    def check_steps(self, problem: Problem, steps: Sequence[str]) -> list[bool]:
        """Per-step labels of a chain for ``problem`` (see `labels_until_error`)."""

    @abstractmethod
    def corrupt(self, rng: random.Random, problem: Problem) -> tuple[Problem, int]:
        """A plausible wrong solution and the 0-based index of its first wrong step."""

    def test_fraction(self, level: int) -> float:
        """Share of this level's distinct questions that belong to the test split."""
        return TEST_FRACTION_EASIEST if level == min(self.levels) else TEST_FRACTION

    def question_levels(self, question: str) -> tuple[int, ...]:
        """The levels at which this task could write ``question`` (empty: it never writes it).

        A superset is safe (the corpus filter then holds out a little more); a missing level
        would let a test question leak. The base answer is every level, for tasks that cannot tell.
        """
        return tuple(self.levels)

    def check_level(self, level: int) -> None:
        """Raise `ConfigError` unless ``level`` is one of this task's levels."""
        if level not in self.levels:
            raise ConfigError(
                f"task {self.name!r} has no level {level}",
                where="levels",
                fix=f"use one of {list(self.levels)}",
            )

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r}, levels={self.levels})"
