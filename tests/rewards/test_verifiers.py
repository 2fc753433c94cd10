"""Answer extraction, the format check, DAPO length shaping, code extraction, task answers."""

from __future__ import annotations

import pytest

from posttrain.errors import ConfigError
from posttrain.rewards.verifiers import (
    check_format,
    extract_boxed,
    extract_code,
    extract_math_answer,
    overlong_penalty,
    verify_task,
)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (r"so \boxed{\frac{1}{2}}.", r"\frac{1}{2}"),
        (r"\boxed{\left\{1, -2\right\}}", r"\left\{1, -2\right\}"),
        (r"\boxed{{a}^{b_{c}}} and", r"{a}^{b_{c}}"),
        (r"first \boxed{1} then \boxed{ 2 }", "2"),
        (r"\boxed{\{1,2\}}", r"\{1,2\}"),
        (r"\fbox{7}", "7"),
        (r"\boxed 5 apples", "5"),
        (r"\boxed{3} then an unclosed \boxed{4", "3"),
        ("no box here", None),
    ],
)
def test_extract_boxed_nested(text, expected):
    assert extract_boxed(text) == expected


@pytest.mark.parametrize(
    ("completion", "expected"),
    [
        (r"We get $x=3$, so the answer is $\boxed{3}$.", "3"),
        ("Thus the answer is 42.", "42"),
        ("The answer is: $-7$", "-7"),
        ("work...\nAnswer: 1/2\n", "1/2"),
        ("**Answer:** 12", "12"),
        ("I computed 3 then 1,234 apples", "1234"),
        ("minus: -5", "-5"),
        ("<think>maybe \\boxed{9}</think>Answer: 8", "8"),
        ("<think>still thinking \\boxed{9}", None),
        ("nothing numeric", None),
    ],
)
def test_extract_math_answer_default_order(completion, expected):
    assert extract_math_answer(completion) == expected


def test_extract_order_is_configurable():
    text = "Answer: 5\nthen again \\boxed{6}"
    assert extract_math_answer(text) == "6"
    assert extract_math_answer(text, order=("answer_colon", "boxed")) == "5"
    assert extract_math_answer(r"Answer: so \boxed{7}", order=("answer_colon",)) == "7"
    assert extract_math_answer("the value 3 and 4", order=("boxed",)) is None
    with pytest.raises(ConfigError, match="unknown answer extractors"):
        extract_math_answer(text, order=("boxed", "magic"))


@pytest.mark.parametrize(
    ("completion", "score"),
    [
        ("<think>3 + 4 = 7</think>\nAnswer: 7", 1.0),
        ("  <think>a\nb</think>Answer: x  \n", 1.0),
        ("Answer: 7", 0.0),  # no think block
        ("<think>a</think><think>b</think>\nAnswer: 7", 0.0),  # two blocks
        ("<think>   </think>\nAnswer: 7", 0.0),  # empty reasoning
        ("<think>a</think>\nAnswer: 7\nAnswer: 8", 0.0),  # two answers
        ("<think>a</think>\nSo:\nAnswer: 7", 0.0),  # text before the answer
        ("<think>a</think>\nAnswer: 7\nbye", 0.0),  # text after the answer line
        ("<think>a</think>\nAnswer:   ", 0.0),  # empty answer
        ("intro <think>a</think>\nAnswer: 7", 0.0),  # does not start with <think>
    ],
)
def test_check_format_hand_values(completion, score):
    got, why = check_format(completion)
    assert got == score
    assert (why == "ok") == (score == 1.0)


@pytest.mark.parametrize(
    ("length", "expected"),
    [(0, 0.0), (80, 0.0), (85, -0.25), (90, -0.5), (99, -0.95), (100, -1.0), (101, -1.0), (10_000, -1.0)],
)
def test_overlong_penalty_dapo_hand_values(length, expected):
    # max 100, buffer 20: 0 up to 80, linear to -1 at 100, -1 beyond
    assert overlong_penalty(length, 100, 20) == pytest.approx(expected)


def test_overlong_penalty_hard_cut_and_errors():
    assert overlong_penalty(100, 100, 0) == 0.0
    assert overlong_penalty(101, 100, 0) == -1.0
    for bad in ((10, 0, 0), (10, 100, 101), (10, 100, -1)):
        with pytest.raises(ConfigError):
            overlong_penalty(*bad)


def test_extract_code_takes_last_fenced_block():
    text = "Plan.\n```python\nx = 1\n```\nBetter:\n```py\ndef f():\n    return 2\n```\n"
    assert extract_code(text) == "def f():\n    return 2\n"
    assert extract_code("```\nprint(1)\n```") == "print(1)\n"
    assert extract_code("def g(): pass") == "def g(): pass"
    assert extract_code("<think>```python\nx=1\n```") == ""


def test_verify_task_uses_the_task_suite():
    assert verify_task("<think>11 + 16 = 27</think>\nAnswer: 27", "arith", "27")
    assert not verify_task("<think>11 + 16 = 28</think>\nAnswer: 28", "arith", "27")
    with pytest.raises(ConfigError, match="unknown task"):
        verify_task("Answer: 1", "arithh", "1")
