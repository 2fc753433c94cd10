from __future__ import annotations

import pytest

from posttrain.data.tasks import Problem, extract_answer, split_steps
from posttrain.data.tasks.base import labels_until_error
from posttrain.errors import DataError

P = Problem("arith", 3, "Compute 11 + 16 + 0 + 14", ("11 + 16 = 27", "27 + 0 = 27", "27 + 14 = 41"), "41")


def test_response_and_messages_format():
    assert P.response() == "<think>11 + 16 = 27\n27 + 0 = 27\n27 + 14 = 41</think>\nAnswer: 41"
    assert P.response(think=False) == "Answer: 41"
    assert P.reasoning(" | ") == "11 + 16 = 27 | 27 + 0 = 27 | 27 + 14 = 41"
    assert P.messages() == [
        {"role": "user", "content": "Compute 11 + 16 + 0 + 14"},
        {"role": "assistant", "reasoning_content": P.reasoning(), "content": "Answer: 41"},
    ]


def test_prompt_record():
    rec = P.prompt_record()
    assert rec["prompt"] == [{"role": "user", "content": P.question}]
    assert rec["metadata"] == {"scorer": "arith", "ground_truth": "41", "level": 3, "task": "arith"}


def test_dict_round_trip_and_errors():
    assert Problem.from_dict(P.to_dict()) == P
    bad = P.to_dict()
    del bad["answer"]
    with pytest.raises(DataError, match="answer"):
        Problem.from_dict(bad)
    with pytest.raises(DataError, match="level"):
        Problem.from_dict({**P.to_dict(), "level": "3"})
    with pytest.raises(DataError, match="steps"):
        Problem.from_dict({**P.to_dict(), "steps": [1, 2]})


@pytest.mark.parametrize(
    ("completion", "expected"),
    [
        (P.response(), "41"),
        ("Answer: 41", "41"),
        ("Answer: 41.", "41"),
        ("  Answer:   7  \n", "7"),
        ("no answer here", None),
        ("Answer:", None),
        ("Answer: 3\nAnswer: 5", "5"),
        ("Answer: 3 then Answer: 5.", "5"),
        ("<think>Answer: 9</think>\nAnswer: 4", "4"),
        ("<think>x\nAnswer: 9</think>\nno final line", None),
        ("<think>still thinking... Answer: 9", None),
        ("<think>a</think>Answer: 1</think>\nAnswer: 2", "2"),
        ("Answer: 41\nextra text", "41"),
        ("Answer: 3 * 7 + 2", "3 * 7 + 2"),
    ],
)
def test_extract_answer(completion, expected):
    assert extract_answer(completion) == expected


def test_split_steps():
    assert split_steps(P.response()) == list(P.steps)
    assert split_steps("<think>a\n\n b \nc") == ["a", "b", "c"]
    assert split_steps("x | y\nAnswer: 3", step_sep="|") == ["x", "y"]


def test_labels_until_error_marks_everything_after_first_error():
    assert labels_until_error(["ok", "ok", "bad", "ok"], lambda s: s == "ok") == [True, True, False, False]
    assert labels_until_error([], lambda s: True) == []
