from __future__ import annotations

import random

import pytest

from posttrain.data.tasks import Problem, get_task
from posttrain.data.tasks.expr import parse_step, safe_eval
from posttrain.errors import DataError

CD = get_task("countdown")
P = Problem("countdown", 2, "Use 2 3 7 to make 23", ("7 * 3 = 21", "21 + 2 = 23"), "7 * 3 + 2")


def _problems(n=60):
    rng = random.Random(3)
    return [CD.generate(rng, level) for level in CD.levels for _ in range(n)]


def test_generated_solutions_are_correct():
    for p in _problems():
        numbers, target = CD.parse_question(p.question)
        assert len(numbers) == p.level + 1 and numbers == sorted(numbers)
        assert all(1 <= x <= 9 for x in numbers)
        assert CD.verify(p.response(), p.answer)
        assert all(CD.check_steps(p, p.steps))
        assert parse_step(p.steps[-1])[3] == target == safe_eval(p.answer)[0]
        assert sorted(safe_eval(p.answer)[1]) == numbers


@pytest.mark.parametrize(
    ("answer", "ok"),
    [
        ("7 * 3 + 2", True),
        ("2 + 3 * 7", True),  # another valid expression
        ("(3 * 7) + 2", True),
        ("3 * 7 + 2.", True),  # trailing period is stripped
        ("3 * 7 + 2 + 0", False),  # 0 is not a given number
        ("7 * 3 + 2 * 1", False),
        ("7 * 3 + 3 - 1", False),
        ("7 * 3", False),  # must use every number
        ("7 + 7 + 7 + 2", False),  # reuse of a number
        ("3 * 7 * 2 - 19", False),
        ("23", False),
        ("__import__('os').system('true')", False),
        ("(lambda: 23)()", False),
        ("-2 + 7 * 3 + 4", False),
    ],
)
def test_verify_any_valid_expression(answer, ok):
    assert CD.verify(f"<think>x</think>\nAnswer: {answer}", P.answer) is ok


def test_verify_bad_ground_truth_is_data_error():
    with pytest.raises(DataError):
        CD.verify("Answer: 1 + 2", "import os")


def test_check_steps_hand_example():
    assert CD.check_steps(P, P.steps) == [True, True]
    assert CD.check_steps(P, ["3 * 7 = 21", "2 + 21 = 23"]) == [True, True]  # any order of operands
    assert CD.check_steps(P, ["7 - 2 = 5", "5 * 3 = 15"]) == [False, False]  # valid move, dead end
    assert CD.check_steps(P, ["7 * 3 = 22", "22 + 2 = 24"]) == [False, False]  # arithmetic slip
    assert CD.check_steps(P, ["7 * 7 = 49"]) == [False]  # 7 is given once
    assert CD.check_steps(P, ["7 * 3 = 21"]) == [True]  # a prefix that can still finish
    assert CD.check_steps(P, [*P.steps, "23 + 0 = 23"]) == [True, True, False]


def test_corrupt_flags_exactly_the_first_wrong_step():
    rng = random.Random(4)
    for p in _problems(40):
        wrong, k = CD.corrupt(rng, p)
        n = len(p.steps)
        assert len(wrong.steps) == n and wrong.steps[:k] == p.steps[:k]
        assert CD.check_steps(p, wrong.steps) == [True] * k + [False] * (n - k)
        assert safe_eval(wrong.answer)[0] == parse_step(wrong.steps[-1])[3]
        assert sorted(safe_eval(wrong.answer)[1]) == sorted(safe_eval(p.answer)[1])
        assert not CD.verify(wrong.response(), p.answer)
