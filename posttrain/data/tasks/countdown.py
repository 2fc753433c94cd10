"""``countdown``: combine the given numbers into the target.

Question ``"Use 2 3 7 to make 23"`` (numbers sorted); steps combine two
available numbers at a time, ``"3 * 7 = 21"``, ``"21 + 2 = 23"``; the answer is
one expression, ``"3 * 7 + 2"``. Level L gives L + 1 numbers in 1..9.

Rule (as in TinyZero's countdown): the answer must use every given number
exactly once, with ``+ - *`` and parentheses, and evaluate to the target. Any
such expression is accepted, not only the reference one. The ground truth is
the reference expression, from which the verifier recovers both the numbers
(its literals) and the target (its value). Answers are evaluated by
`expr.safe_eval`, never by ``eval``.
"""

from __future__ import annotations

import random
import re
from collections import Counter
from collections.abc import Sequence

from posttrain.data.tasks.base import Problem, Task, extract_answer, labels_until_error
from posttrain.data.tasks.expr import (
    OPS,
    Expr,
    Node,
    apply_op,
    format_step,
    parse_step,
    reachable,
    render,
    safe_eval,
)
from posttrain.errors import ConfigError, DataError

_QUESTION_RE = re.compile(r"^Use (\d+(?: \d+)*) to make (-?\d+)$")
_MAX_TRIES = 10_000

Pool = list[tuple[int, Expr]]
Move = tuple[int, int, str]


def _combine(pool: Pool, i: int, j: int, op: str) -> tuple[Pool, str]:
    """Replace pool items i and j by ``pool[i] op pool[j]``; returns the new pool and the step text."""
    (a, ea), (b, eb) = pool[i], pool[j]
    result = apply_op(a, op, b)
    rest = [p for k, p in enumerate(pool) if k not in (i, j)]
    return [*rest, (result, Node(op, ea, eb))], format_step(a, op, b, result)


def _moves(pool: Pool, ops: Sequence[str]) -> list[Move]:
    """Every move ``(i, j, op)``, larger number first (one fixed order is easier to learn, and ``-`` stays >= 0)."""
    moves = []
    for i in range(len(pool)):
        for j in range(i + 1, len(pool)):
            big, small = (i, j) if pool[i][0] >= pool[j][0] else (j, i)
            moves += [(big, small, op) for op in ops]
    return moves


class CountdownTask(Task):
    """Reach a target number from given numbers with + - *."""

    def __init__(self, name: str = "countdown", max_value: int = 9, max_target: int = 99, max_level: int = 3):
        """
        Args:
            max_value: numbers are drawn from 1..max_value.
            max_target: every intermediate value of the reference solution is in 1..max_target.
            max_level: levels are 1..max_level; level L gives L + 1 numbers.
        """
        if max_value < 1 or max_target < 1 or max_level < 1:
            raise ConfigError("max_value, max_target and max_level must be >= 1", where="countdown")
        self.name = name
        self.max_value = max_value
        self.max_target = max_target
        self.ops = OPS
        self.levels = tuple(range(1, max_level + 1))
        self.description = (
            f"make the target from level+1 numbers in 1..{max_value}, each used exactly once, with + - *"
        )

    def _solve_randomly(self, rng: random.Random, numbers: list[int]) -> tuple[Pool, list[str]] | None:
        """Random moves until one number is left; None if an intermediate leaves 1..max_target."""
        pool: Pool = [(v, v) for v in numbers]
        steps: list[str] = []
        while len(pool) > 1:
            pool, step = _combine(pool, *rng.choice(_moves(pool, self.ops)))
            if not 1 <= pool[-1][0] <= self.max_target:
                return None
            steps.append(step)
        return pool, steps

    def generate(self, rng: random.Random, level: int) -> Problem:
        """Draw sorted numbers and a random solution; its value becomes the target."""
        self.check_level(level)
        for _ in range(_MAX_TRIES):
            numbers = sorted(rng.randint(1, self.max_value) for _ in range(level + 1))
            solved = self._solve_randomly(rng, numbers)
            if solved is not None:
                (target, tree), steps = solved[0][0], solved[1]
                question = f"Use {' '.join(map(str, numbers))} to make {target}"
                return Problem(self.name, level, question, tuple(steps), render(tree))
        raise ConfigError(f"no countdown problem within max_target={self.max_target}", where="max_target")

    def verify(self, completion: str, ground_truth: str) -> bool:
        """The answer uses exactly the ground truth's numbers (as a multiset) and has its value."""
        truth = safe_eval(ground_truth)
        if truth is None:
            raise DataError(
                f"countdown ground truth {ground_truth!r} is not an expression", where="ground_truth"
            )
        answer = extract_answer(completion)
        got = safe_eval(answer) if answer is not None else None
        return got is not None and got[0] == truth[0] and sorted(got[1]) == sorted(truth[1])

    @staticmethod
    def parse_question(question: str) -> tuple[list[int], int]:
        """``"Use 2 3 7 to make 23"`` -> ``([2, 3, 7], 23)``."""
        m = _QUESTION_RE.match(question.strip())
        if m is None:
            raise DataError(f"not a countdown question: {question!r}", where="question")
        return [int(x) for x in m.group(1).split()], int(m.group(2))

    def question_levels(self, question: str) -> tuple[int, ...]:
        """The level whose count of given numbers (level + 1) the question has."""
        m = _QUESTION_RE.match(question.strip())
        n = len(m.group(1).split()) if m else 0
        return tuple(lv for lv in self.levels if n == lv + 1)

    def check_steps(self, problem: Problem, steps: Sequence[str]) -> list[bool]:
        """A step is right iff it combines two available numbers correctly and the target stays reachable.

        Reachable means the numbers left after the step can still make the
        target using each exactly once (exhaustive search), so an arithmetically
        valid move into a dead end is a wrong step: the label a process reward
        model should learn.
        """
        numbers, target = self.parse_question(problem.question)
        pool = Counter(numbers)

        def accept(step: str) -> bool:
            nonlocal pool
            parsed = parse_step(step)
            if parsed is None:
                return False
            a, op, b, result = parsed
            used = Counter([a, b])
            if op not in self.ops or result != apply_op(a, op, b) or used - pool:
                return False
            after = pool - used + Counter([result])
            if not reachable(list(after.elements()), target, self.ops):
                return False
            pool = after
            return True

        return labels_until_error(steps, accept)

    def corrupt(self, rng: random.Random, problem: Problem) -> tuple[Problem, int]:
        """Follow the reference chain to a random step k, take a valid move into a dead end, finish randomly.

        The wrong move prefers the reference step's pair with another operator.
        Every later state is a dead end too, so the final answer never equals
        the target and ``verify`` rejects it.
        """
        numbers, target = self.parse_question(problem.question)
        if not problem.steps or not all(self.check_steps(problem, problem.steps)):
            raise DataError(f"reference chain of {problem.question!r} is not a valid solution", where="steps")
        pools: list[Pool] = [[(v, v) for v in numbers]]
        for step in problem.steps:
            a, op, b, _ = parse_step(step)
            pool = pools[-1]
            i = next(k for k, (v, _) in enumerate(pool) if v == a)
            j = next(k for k, (v, _) in enumerate(pool) if v == b and k != i)
            pools.append(_combine(pool, i, j, op)[0])
        order = list(range(len(problem.steps)))
        rng.shuffle(order)
        for k in order:
            pool = pools[k]
            dead = [m for m in _moves(pool, self.ops) if not self._reaches(_combine(pool, *m)[0], target)]
            if dead:
                return self._finish(rng, problem, k, pool, dead), k
        raise AssertionError("no dead-end move exists; the final step always has one")

    def _reaches(self, pool: Pool, target: int) -> bool:
        return reachable([v for v, _ in pool], target, self.ops)

    def _finish(self, rng: random.Random, problem: Problem, k: int, pool: Pool, dead: list[Move]) -> Problem:
        """Reference steps before k, a dead-end move at k, then random moves to the end."""
        a, _, b, _ = parse_step(problem.steps[k])
        same_pair = [m for m in dead if {pool[m[0]][0], pool[m[1]][0]} == {a, b}]
        pool, step = _combine(pool, *rng.choice(same_pair or dead))
        steps = [*problem.steps[:k], step]
        while len(pool) > 1:
            pool, step = _combine(pool, *rng.choice(_moves(pool, self.ops)))
            steps.append(step)
        return Problem(problem.task, problem.level, problem.question, tuple(steps), render(pool[0][1]))
