"""``arith``: multi-step integer arithmetic, one operation per step.

Question ``"Compute 11 + 16 + 0 + 14"``; steps ``"11 + 16 = 27"``, ``"27 + 0 = 27"``,
``"27 + 14 = 41"``; answer ``"41"``. Level L has L + 1 operands.

The default (numbers 0..19, ``+ -``, running value never negative) is what a
~1M-parameter model learns in minutes on CPU. Harder variants come from the
constructor: ``ops=("+", "-", "*")`` adds precedence, ``parens=True`` draws a
random expression tree such as ``"(17 + 8) * 2 - 19"``. Steps always follow the
evaluation order of `expr.next_reduction`: innermost parenthesis group first,
``*`` before ``+ -``, left to right.
"""

from __future__ import annotations

import random
import re
from collections.abc import Sequence

from posttrain.data.tasks.base import Problem, Task, extract_answer, labels_until_error
from posttrain.data.tasks.expr import (
    OPS,
    Token,
    apply_op,
    format_step,
    next_reduction,
    parse_step,
    random_tree,
    reduce_all,
    reduce_at,
    render,
    render_tokens,
    tokenize,
    well_formed,
)
from posttrain.errors import ConfigError, DataError

PREFIX = "Compute "
_MAX_TRIES = 10_000
_INT_RE = re.compile(r"^[+-]?\d{1,30}$")


def parse_int(text: str | None) -> int | None:
    """A plain (optionally signed) integer, else None."""
    if text is None or not _INT_RE.match(text.strip()):
        return None
    return int(text.strip())


class ArithTask(Task):
    """Evaluate an integer expression step by step."""

    def __init__(
        self,
        name: str = "arith",
        max_value: int = 19,
        ops: Sequence[str] = ("+", "-"),
        parens: bool = False,
        max_level: int = 4,
        allow_negative: bool = False,
        max_abs: int | None = None,
    ):
        """
        Args:
            max_value: operands are drawn uniformly from 0..max_value.
            ops: operators to draw from, a subset of ``+ - *``.
            parens: draw a random expression tree rendered with minimal parentheses;
                otherwise a flat ``a op b op c``.
            max_level: levels are 1..max_level; level L has L + 1 operands.
            allow_negative: allow negative intermediate values; otherwise such
                draws are rejected (uniform over the allowed problems).
            max_abs: reject problems with any intermediate value beyond +-max_abs.
        """
        bad = [op for op in ops if op not in OPS]
        if bad or not ops:
            raise ConfigError(
                f"unsupported operators {bad or ops}", where="ops", fix=f"use a subset of {OPS}"
            )
        if max_value < 1 or max_level < 1:
            raise ConfigError("max_value and max_level must be >= 1", where="max_value/max_level")
        self.name = name
        self.max_value = max_value
        self.ops = tuple(ops)
        self.parens = parens
        self.allow_negative = allow_negative
        self.max_abs = max_abs
        self.levels = tuple(range(1, max_level + 1))
        shape = "expression tree" if parens else "chain"
        self.description = f"evaluate a {shape} of level+1 numbers in 0..{max_value} with {' '.join(self.ops)}, one step per operation"

    def _problem(self, level: int, tokens: list[Token]) -> Problem | None:
        """The worked problem of an expression, or None if an intermediate value breaks the limits."""
        steps = reduce_all(tokens)
        if not all(self._allowed(r) for *_, r in steps):
            return None
        return Problem(
            task=self.name,
            level=level,
            question=PREFIX + render_tokens(tokens),
            steps=tuple(format_step(*s) for s in steps),
            answer=str(steps[-1][3]),
        )

    def _draw(self, rng: random.Random, n: int) -> list[Token]:
        if self.parens:
            return tokenize(render(random_tree(rng, n, self.ops, 0, self.max_value)))
        tokens: list[Token] = [rng.randint(0, self.max_value)]
        for _ in range(n - 1):
            tokens += [rng.choice(self.ops), rng.randint(0, self.max_value)]
        return tokens

    def _allowed(self, value: int) -> bool:
        if value < 0 and not self.allow_negative:
            return False
        return self.max_abs is None or abs(value) <= self.max_abs

    def generate(self, rng: random.Random, level: int) -> Problem:
        """Draw operands and operators, rejecting draws whose intermediates break the limits."""
        self.check_level(level)
        for _ in range(_MAX_TRIES):
            if problem := self._problem(level, self._draw(rng, level + 1)):
                return problem
        raise ConfigError(
            f"task {self.name!r} found no level-{level} problem within its limits in {_MAX_TRIES} draws",
            where="max_abs/allow_negative",
            fix="loosen max_abs or set allow_negative=True",
        )

    def verify(self, completion: str, ground_truth: str) -> bool:
        """The extracted answer equals the ground truth as an integer (so ``"041"`` == ``"41"``)."""
        got, want = parse_int(extract_answer(completion)), parse_int(ground_truth)
        if want is None:
            raise DataError(f"arith ground truth {ground_truth!r} is not an integer", where="ground_truth")
        return got is not None and got == want

    def _tokens(self, problem: Problem) -> list[Token]:
        tokens = tokenize(problem.question.removeprefix(PREFIX))
        if not problem.question.startswith(PREFIX) or not tokens:
            raise DataError(f"not an arith question: {problem.question!r}", where="question")
        return tokens

    def _operands(self, question: str) -> list[int] | None:
        """The operands of a well-formed question (`expr.well_formed`), else None."""
        tokens = tokenize(question.removeprefix(PREFIX)) if question.startswith(PREFIX) else None
        return [t for t in tokens if isinstance(t, int)] if tokens and well_formed(tokens) else None

    def question_levels(self, question: str) -> tuple[int, ...]:
        """The level whose operand count (level + 1) the question has; empty if it is no arith question."""
        values = self._operands(question)
        return tuple(lv for lv in self.levels if values and len(values) == lv + 1)

    def check_steps(self, problem: Problem, steps: Sequence[str]) -> list[bool]:
        """A step is right iff it is the next reduction of the true expression, correctly computed.

        Operands of ``+`` and ``*`` may be written in either order. Stopping
        early is not an error; a step after the expression is fully reduced is.
        """
        state = self._tokens(problem)

        def accept(step: str) -> bool:
            nonlocal state
            parsed, nxt = parse_step(step), next_reduction(state)
            if parsed is None or nxt is None:
                return False
            toks, i = nxt
            a, op, b, result = parsed
            want = (toks[i], toks[i + 2])
            same = (a, b) == want or (op in "+*" and (b, a) == want)
            if op != toks[i + 1] or not same or result != apply_op(a, op, b):
                return False
            state = reduce_at(toks, i, result)
            return True

        return labels_until_error(steps, accept)

    def corrupt(self, rng: random.Random, problem: Problem) -> tuple[Problem, int]:
        """One slip at a random step, then correct steps from the wrong value on.

        The slip is either a wrong result (off by 1..3) or a miscopied left
        operand (off by 1..3, result computed from it). Values stay >= 0 unless
        the task allows negatives. With only ``+ -`` the final answer always
        differs from the true one; with ``*`` it may not (a factor of 0).
        """
        state = self._tokens(problem)
        n_steps = len(reduce_all(state))
        k = rng.randrange(n_steps)
        steps: list[str] = []
        for idx in range(n_steps):
            toks, i = next_reduction(state)
            a, op, b = toks[i], toks[i + 1], toks[i + 2]
            if idx == k:
                if rng.random() < 0.5:
                    a = self._nudge(rng, a)
                    result = apply_op(a, op, b)
                    if result < 0 and not self.allow_negative:
                        a, result = toks[i], self._nudge(rng, apply_op(toks[i], op, b))
                else:
                    result = self._nudge(rng, apply_op(a, op, b))
            else:
                result = apply_op(a, op, b)
            steps.append(format_step(a, op, b, result))
            state = reduce_at(toks, i, result)
        wrong = Problem(problem.task, problem.level, problem.question, tuple(steps), str(state[0]))
        return wrong, k

    def _nudge(self, rng: random.Random, value: int) -> int:
        """``value`` moved by a nonzero amount in 1..3, kept >= 0 when negatives are not allowed."""
        delta = rng.randint(1, 3) * rng.choice((-1, 1))
        if value + delta < 0 and not self.allow_negative:
            delta = -delta
        return value + delta


class MagnitudeArithTask(ArithTask):
    """Chains of a fixed number of operands; the level is the band of the largest operand.

    ``"Compute 3 + 17 + 6"`` is level 3 of the default bands (0-9, 10-14, 15-19, 20-29):
    every level has the same chain length and step format, so a harder level differs only in
    the numbers it uses. That makes "demonstrations run out" measurable without a change of
    structure: SFT on the small-number levels, then RL with only the verifier on the levels
    whose numbers no demonstration used (the quickstart does this). Changing the operand count
    between levels instead (`ArithTask`) tests length generalisation, which a tiny model fails
    outright (it keeps the step count it was trained on), leaving RL nothing to sample.
    """

    def __init__(
        self,
        name: str = "arith_mag",
        bands: Sequence[tuple[int, int]] = ((0, 9), (10, 14), (15, 19), (20, 29)),
        operands: int = 3,
        ops: Sequence[str] = ("+", "-"),
    ):
        """
        Args:
            bands: per level (1, 2, ...), the inclusive range of the largest operand; the other
                operands are drawn from 0 up to the band's top.
            operands: numbers per chain (>= 2).
            ops: operators to draw from (``+ -`` or with ``*``; no parentheses).
        """
        if operands < 2 or not bands or any(not 0 <= lo <= hi for lo, hi in bands):
            raise ConfigError("need operands >= 2 and bands of 0 <= low <= high", where="bands/operands")
        super().__init__(name=name, max_value=max(hi for _, hi in bands), ops=ops, max_level=len(bands))
        self.bands, self.operands = tuple(tuple(b) for b in bands), operands
        ranges = ", ".join(f"{lo}-{hi}" for lo, hi in self.bands)
        self.description = f"evaluate a chain of {operands} numbers with {' '.join(self.ops)}; level = band of the largest number ({ranges})"

    def question_levels(self, question: str) -> tuple[int, ...]:
        """The levels whose band holds the largest operand, for chains of ``operands`` numbers."""
        values = self._operands(question)
        if not values or len(values) != self.operands:
            return ()
        return tuple(lv for lv, (lo, hi) in enumerate(self.bands, 1) if lo <= max(values) <= hi)

    def generate(self, rng: random.Random, level: int) -> Problem:
        """Operands uniform in 0..top of the band, rejected unless the largest lies in the band
        and every intermediate value is >= 0."""
        self.check_level(level)
        low, high = self.bands[level - 1]
        for _ in range(_MAX_TRIES):
            values = [rng.randint(0, high) for _ in range(self.operands)]
            if max(values) < low:
                continue
            tokens: list[Token] = [values[0]]
            for v in values[1:]:
                tokens += [rng.choice(self.ops), v]
            if problem := self._problem(level, tokens):
                return problem
        raise ConfigError(
            f"task {self.name!r} found no level-{level} problem in {_MAX_TRIES} draws", where="bands"
        )
