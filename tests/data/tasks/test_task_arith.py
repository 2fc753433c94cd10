from __future__ import annotations

import random

import pytest

from posttrain.data.tasks import ArithTask, Problem, get_task
from posttrain.data.tasks.expr import parse_step
from posttrain.errors import ConfigError

ARITH = get_task("arith")
HARD = get_task("arith_hard")


def _problems(task, n=60):
    rng = random.Random(1)
    return [task.generate(rng, level) for level in task.levels for _ in range(n)]


@pytest.mark.parametrize("task", [ARITH, HARD], ids=lambda t: t.name)
def test_generated_solutions_are_correct(task):
    for p in _problems(task):
        assert task.verify(p.response(), p.answer)
        assert task.verify(p.response(think=False), p.answer)
        assert all(task.check_steps(p, p.steps))
        assert len(p.steps) == p.level  # level L: L + 1 operands, one step per operation
        assert str(parse_step(p.steps[-1])[3]) == p.answer
        assert p.answer == str(eval(p.question.removeprefix("Compute ")))  # trusted generated text


def test_default_difficulty_matches_the_learnable_setting():
    for p in _problems(ARITH):
        numbers = [int(t) for t in p.question.split() if t.isdigit()]
        assert all(0 <= x <= 19 for x in numbers) and len(numbers) == p.level + 1
        assert all(parse_step(s)[3] >= 0 for s in p.steps)
        assert "*" not in p.question and "(" not in p.question


def test_verify():
    assert ARITH.verify("<think>x</think>\nAnswer: 041", "41")
    assert not ARITH.verify("<think>x</think>\nAnswer: 42", "41")
    assert not ARITH.verify("<think>Answer: 41", "41")
    assert not ARITH.verify("Answer: forty-one", "41")


def test_check_steps_hand_example():
    p = Problem(
        "arith_hard", 3, "Compute (17 + 8) * 2 - 19", ("17 + 8 = 25", "25 * 2 = 50", "50 - 19 = 31"), "31"
    )
    assert HARD.check_steps(p, p.steps) == [True, True, True]
    assert HARD.check_steps(p, ["8 + 17 = 25", "2 * 25 = 50", "50 - 19 = 31"]) == [True, True, True]
    assert HARD.check_steps(p, ["17 + 8 = 25", "25 * 2 = 50"]) == [True, True]  # unfinished is not wrong
    assert HARD.check_steps(p, ["17 + 8 = 26", "26 * 2 = 52", "52 - 19 = 33"]) == [False, False, False]
    assert HARD.check_steps(p, ["17 + 8 = 25", "19 - 2 = 17", "25 * 17 = 425"]) == [True, False, False]
    assert HARD.check_steps(p, [*p.steps, "31 + 0 = 31"]) == [True, True, True, False]
    assert HARD.check_steps(p, ["17 + 8 = 25", "garbage", "50 - 19 = 31"]) == [True, False, False]


@pytest.mark.parametrize("task", [ARITH, HARD], ids=lambda t: t.name)
def test_corrupt_flags_exactly_the_first_wrong_step(task):
    rng = random.Random(2)
    for p in _problems(task, 40):
        wrong, k = task.corrupt(rng, p)
        n = len(p.steps)
        assert len(wrong.steps) == n and wrong.steps[:k] == p.steps[:k]
        assert task.check_steps(p, wrong.steps) == [True] * k + [False] * (n - k)
        assert str(parse_step(wrong.steps[-1])[3]) == wrong.answer  # later steps follow from the error
        if wrong.answer != p.answer:
            assert not task.verify(wrong.response(), p.answer)
        if task is ARITH:  # with only + and - an error always changes the answer
            assert wrong.answer != p.answer


def test_constructor_validation_and_impossible_limits():
    with pytest.raises(ConfigError, match="ops"):
        ArithTask(ops=("/",))
    tight = ArithTask(name="tight", ops=("*",), max_value=19, max_abs=-1)
    with pytest.raises(ConfigError, match="max_abs"):
        tight.generate(random.Random(0), 1)
    with pytest.raises(ConfigError, match="level"):
        ARITH.generate(random.Random(0), 9)


def test_magnitude_levels_change_the_numbers_not_the_chain():
    mag = get_task("arith_mag")
    bands = {1: (0, 9), 2: (10, 14), 3: (15, 19), 4: (20, 29)}
    for p in _problems(mag):
        numbers = [int(t) for t in p.question.removeprefix("Compute ").split() if t.isdigit()]
        low, high = bands[p.level]
        assert len(numbers) == 3 and len(p.steps) == 2  # same chain at every level
        assert low <= max(numbers) <= high and min(numbers) >= 0
        assert all(parse_step(s)[3] >= 0 for s in p.steps)
        assert p.answer == str(eval(p.question.removeprefix("Compute ")))
        assert all(mag.check_steps(p, p.steps)) and mag.verify(p.response(), p.answer)
        wrong, k = mag.corrupt(random.Random(0), p)
        assert mag.check_steps(p, wrong.steps)[k] is False and not mag.verify(wrong.response(), p.answer)


def test_magnitude_task_rejects_bad_bands():
    from posttrain.data.tasks.arith import MagnitudeArithTask

    with pytest.raises(ConfigError, match="bands"):
        MagnitudeArithTask(bands=((5, 2),))
    with pytest.raises(ConfigError, match="bands"):
        MagnitudeArithTask(operands=1)
