"""``sort``: sort a list of digits by repeated selection of the minimum.

Question ``"Sort 7 2 9 2"``; one step per round names the minimum of what is
left, ``"min 7 2 9 2 = 2"``, ``"min 7 9 2 = 2"``, ``"min 7 9 = 7"``, ``"min 9 = 9"``
(the first occurrence of the minimum is removed, the rest keep their order);
answer ``"2 2 7 9"``, the step values in order. Level L sorts L + 2 numbers in
0..9, so every number is one token.
"""

from __future__ import annotations

import random
import re
from collections.abc import Sequence

from posttrain.data.tasks.base import Problem, Task, extract_answer, labels_until_error
from posttrain.errors import ConfigError, DataError

PREFIX = "Sort "
_STEP_RE = re.compile(r"^\s*min\s+(-?\d+(?:\s+-?\d+)*)\s*=\s*(-?\d+)\s*$")
_LIST_RE = re.compile(r"^-?\d+(?:[\s,]+-?\d+)*$")


def parse_list(text: str | None) -> list[int] | None:
    """``"2 2 7 9"`` or ``"2, 2, 7, 9"`` -> ``[2, 2, 7, 9]``; None if not a list of ints."""
    if text is None or not _LIST_RE.match(text.strip()):
        return None
    return [int(x) for x in re.split(r"[\s,]+", text.strip())]


def format_step(values: Sequence[int], picked: int) -> str:
    """``"min 7 2 9 2 = 2"``."""
    return f"min {' '.join(map(str, values))} = {picked}"


def parse_step(step: str) -> tuple[list[int], int] | None:
    """``"min 7 9 = 7"`` -> ``([7, 9], 7)``; None if malformed."""
    m = _STEP_RE.match(step)
    if m is None:
        return None
    return [int(x) for x in m.group(1).split()], int(m.group(2))


def _remove_first(values: Sequence[int], value: int) -> list[int]:
    out = list(values)
    out.remove(value)
    return out


def selection_steps(values: Sequence[int]) -> list[str]:
    """The reference chain: one ``min`` step per element."""
    steps, left = [], list(values)
    while left:
        steps.append(format_step(left, min(left)))
        left = _remove_first(left, min(left))
    return steps


class SortTask(Task):
    """Sort small numbers ascending, one selected minimum per step."""

    def __init__(self, name: str = "sort", max_value: int = 9, max_level: int = 4, min_length: int = 3):
        """
        Args:
            max_value: numbers are drawn from 0..max_value.
            max_level: levels are 1..max_level.
            min_length: level L sorts L + min_length - 1 numbers.
        """
        if max_value < 1 or max_level < 1 or min_length < 2:
            raise ConfigError("need max_value >= 1, max_level >= 1, min_length >= 2", where="sort")
        self.name = name
        self.max_value = max_value
        self.min_length = min_length
        self.levels = tuple(range(1, max_level + 1))
        self.description = (
            f"sort level+{min_length - 1} numbers in 0..{max_value} by repeated selection of the minimum"
        )

    def generate(self, rng: random.Random, level: int) -> Problem:
        """A uniformly random list of the level's length."""
        self.check_level(level)
        values = [rng.randint(0, self.max_value) for _ in range(level + self.min_length - 1)]
        answer = " ".join(map(str, sorted(values)))
        return Problem(
            self.name, level, PREFIX + " ".join(map(str, values)), tuple(selection_steps(values)), answer
        )

    def verify(self, completion: str, ground_truth: str) -> bool:
        """The answer, read as a list of ints (space or comma separated), equals the ground truth."""
        want = parse_list(ground_truth)
        if want is None:
            raise DataError(f"sort ground truth {ground_truth!r} is not a list of ints", where="ground_truth")
        return parse_list(extract_answer(completion)) == want

    def question_levels(self, question: str) -> tuple[int, ...]:
        """The level whose list length (level + min_length - 1) the question has."""
        values = parse_list(question.removeprefix(PREFIX)) if question.startswith(PREFIX) else None
        n = len(values) if values else 0
        return tuple(lv for lv in self.levels if n == lv + self.min_length - 1)

    def _values(self, problem: Problem) -> list[int]:
        values = parse_list(problem.question.removeprefix(PREFIX))
        if not problem.question.startswith(PREFIX) or values is None:
            raise DataError(f"not a sort question: {problem.question!r}", where="question")
        return values

    def check_steps(self, problem: Problem, steps: Sequence[str]) -> list[bool]:
        """A step is right iff it copies exactly the numbers left (in order) and names their minimum."""
        left = self._values(problem)

        def accept(step: str) -> bool:
            nonlocal left
            parsed = parse_step(step)
            if parsed is None or not left or parsed[0] != left or parsed[1] != min(left):
                return False
            left = _remove_first(left, parsed[1])
            return True

        return labels_until_error(steps, accept)

    def corrupt(self, rng: random.Random, problem: Problem) -> tuple[Problem, int]:
        """At a random step either pick a number that is not the minimum or miscopy one number.

        Later steps are correct selections from the wrong state, so the answer
        is unsorted or holds a wrong number: it always differs from the truth.
        """
        left = self._values(problem)
        k = rng.randrange(len(left))
        steps, picks = [], []
        for idx in range(len(left)):
            shown, pick = list(left), min(left)
            if idx == k:
                larger = sorted({v for v in left if v > pick})
                if larger and rng.random() < 0.5:
                    pick = rng.choice(larger[:2])
                else:
                    pos = rng.randrange(len(shown))
                    shown[pos] = rng.choice([v for v in range(self.max_value + 1) if v != shown[pos]])
                    left, pick = shown, min(shown)
            steps.append(format_step(shown, pick))
            picks.append(pick)
            left = _remove_first(left, pick)
        answer = " ".join(map(str, picks))
        return Problem(problem.task, problem.level, problem.question, tuple(steps), answer), k
