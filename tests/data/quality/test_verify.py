"""Answer verification through the reward registry (task verifier, math-verify, sandbox) and chain consistency."""

from __future__ import annotations

from fractions import Fraction

import pytest
from quality_helpers import chat, make_item

from posttrain.data.quality.verify import VerifyConfig, arith_value, chain_consistent, verify_answers
from posttrain.data.tasks import TASKS, make_split


def verdicts(rows, **cfg):
    items = [make_item(r, where=f"t.jsonl:{i + 1}") for i, r in enumerate(rows)]
    out = list(verify_answers(items, VerifyConfig(**cfg)))
    return [(it.removed.evidence.get("check"), it.removed.evidence) if it.removed else None for it in out]


def test_arith_value():
    assert arith_value("(4 + 8 - 7) * 3") == 15
    assert arith_value("-3/4") == Fraction(-3, 4)
    assert arith_value("0 2 5") is None and arith_value("x + 1") is None and arith_value("1/0") is None


def test_every_task_chain_is_consistent_and_a_changed_answer_is_not():
    for name in TASKS:
        for p in make_split(name, "train", 3):
            assert chain_consistent(p.reasoning(), p.final())[0] in (True, None), (name, p)
    assert chain_consistent("18 + 7 = 25\n25 + 3 = 28", "Answer: 28") == (True, "reasoning ends on 28")
    ok, why = chain_consistent("18 + 7 = 25\n25 + 3 = 28", "Answer: 30")
    assert ok is False and "28" in why
    assert chain_consistent("8 - 7 = 1\n4 + 1 = 5\n5 * 3 = 15", "Answer: (4 + 8 - 7) * 3")[0] is True
    assert chain_consistent("min 8 6 = 6", "Answer: 0 2 6")[0] is None  # a list: not one value to check
    assert chain_consistent("", "Answer: 3")[0] is None  # no reasoning: nothing to check
    assert chain_consistent("so 141", "The answer is 41")[0] is False  # 41 is not the number 141


def test_task_scorer_and_chain_drop_the_wrong_records():
    meta = {"scorer": "arith", "ground_truth": "28"}
    right = {
        "messages": [
            {"role": "user", "content": "Compute 18 + 7 + 3"},
            {"role": "assistant", "reasoning_content": "18 + 7 = 25\n25 + 3 = 28", "content": "Answer: 28"},
        ],
        "metadata": meta,
    }
    wrong = {**right, "messages": [right["messages"][0], {**right["messages"][1], "content": "Answer: 30"}]}
    inline = chat("Compute 18 + 7 + 3", "<think>18 + 7 = 25\n25 + 3 = 29</think>\nAnswer: 28", metadata=meta)
    got = verdicts([right, wrong, inline], answers=True)
    assert got[0] is None and got[2] is None  # inline is right though its chain is not
    assert got[1][0] == "scorer" and got[1][1]["scorer"] == "arith" and got[1][1]["score"] == 0.0
    got = verdicts([right, wrong, inline], chain=True)
    assert got[0] is None and got[1][0] == "chain" and got[2][0] == "chain"


def test_math_scorer_uses_math_verify():
    pytest.importorskip("math_verify")
    meta = {"scorer": "math", "ground_truth": "\\frac{1}{2}"}
    rows = [
        chat("Half of 1?", "It is \\boxed{0.5}", metadata=meta),
        chat("Half of 1?", "\\boxed{2}", metadata=meta),
    ]
    got = verdicts(rows, answers=True)
    assert got[0] is None and got[1][1]["scorer"] == "math"


def test_code_scorer_runs_the_tests_in_the_sandbox():
    meta = {"scorer": "code", "tests": ["assert add(1, 2) == 3", "assert add(-1, 1) == 0"]}
    good = {
        "prompt": "Write add.",
        "completion": "```python\ndef add(a, b):\n    return a + b\n```",
        "metadata": meta,
    }
    bad = {**good, "completion": "```python\ndef add(a, b):\n    return a - b\n```"}
    got = verdicts([good, bad], answers=True)
    assert got[0] is None
    assert got[1][1]["scorer"] == "code" and "wrong_answer" in got[1][1]["why"]


def test_records_without_a_scorer_or_one_response_pass():
    pref = {
        "prompt": "q",
        "chosen": "a",
        "rejected": "b",
        "metadata": {"scorer": "arith", "ground_truth": "1"},
    }
    assert verdicts([chat("q", "a"), pref], answers=True, chain=True) == [None, None]
