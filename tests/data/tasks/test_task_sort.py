from __future__ import annotations

import random

from posttrain.data.tasks import Problem, get_task
from posttrain.data.tasks.sort import parse_step

SORT = get_task("sort")
P = Problem(
    "sort", 2, "Sort 7 2 9 2", ("min 7 2 9 2 = 2", "min 7 9 2 = 2", "min 7 9 = 7", "min 9 = 9"), "2 2 7 9"
)


def _problems(n=60):
    rng = random.Random(5)
    return [SORT.generate(rng, level) for level in SORT.levels for _ in range(n)]


def test_generated_solutions_are_correct():
    for p in _problems():
        values = [int(x) for x in p.question.split()[1:]]
        assert len(values) == p.level + 2
        assert p.answer == " ".join(map(str, sorted(values)))
        assert " ".join(str(parse_step(s)[1]) for s in p.steps) == p.answer
        assert SORT.verify(p.response(), p.answer)
        assert all(SORT.check_steps(p, p.steps))


def test_reference_chain_and_verify():
    rng = random.Random(0)
    assert SORT.generate(rng, 1).steps  # smoke: level 1 works
    assert SORT.check_steps(P, P.steps) == [True] * 4
    assert SORT.verify("Answer: 2, 2, 7, 9", "2 2 7 9")
    assert not SORT.verify("Answer: 2 7 9", "2 2 7 9")
    assert not SORT.verify("Answer: 2 2 9 7", "2 2 7 9")


def test_check_steps_hand_example():
    assert SORT.check_steps(P, ["min 7 2 9 2 = 2", "min 7 2 9 = 2"]) == [True, False]  # removed the wrong 2
    assert SORT.check_steps(P, ["min 7 2 9 2 = 7"]) == [False]
    assert SORT.check_steps(
        P, ["min 7 2 9 2 = 2", "min 7 9 2 = 2", "min 7 9 = 7", "min 9 = 9", "min = 0"]
    ) == [
        True,
        True,
        True,
        True,
        False,
    ]


def test_corrupt_flags_exactly_the_first_wrong_step():
    rng = random.Random(6)
    for p in _problems(40):
        wrong, k = SORT.corrupt(rng, p)
        n = len(p.steps)
        assert len(wrong.steps) == n and wrong.steps[:k] == p.steps[:k]
        assert SORT.check_steps(p, wrong.steps) == [True] * k + [False] * (n - k)
        assert " ".join(str(parse_step(s)[1]) for s in wrong.steps) == wrong.answer
        assert wrong.answer != p.answer and not SORT.verify(wrong.response(), p.answer)
