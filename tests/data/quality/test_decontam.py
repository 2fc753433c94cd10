"""Decontamination: n-gram overlap and exact question match against eval files and the task suite."""

from __future__ import annotations

import pytest
from quality_helpers import chat, make_item

from posttrain.data.quality.decontam import DecontamConfig, build_index, decontaminate, tokens
from posttrain.errors import ConfigError, DataError

LONG_Q = "A train leaves the station at noon travelling at sixty miles per hour toward a city 180 miles away"
SHORT_Q = "Compute 11 + 16 - 4"


@pytest.fixture
def evals(jsonl):
    return jsonl("eval.jsonl", [{"prompt": LONG_Q}, {"prompt": SHORT_Q}, {"prompt": "Hi?"}])


def check(rows, **cfg):
    index = build_index(DecontamConfig(**cfg))
    items = [make_item(r, where=f"train.jsonl:{i + 1}") for i, r in enumerate(rows)]
    return [it.removed.evidence if it.removed else None for it in decontaminate(items, index)]


def test_tokens_keep_operators():
    assert tokens("Compute 11 + 16") == ["compute", "11", "+", "16"]
    assert tokens("Compute 11 + 16") != tokens("Compute 11 - 16")


def test_removes_records_containing_an_eval_question(evals):
    inside = chat(f"Solve this. {LONG_Q.upper()}. Show work.", "3 hours")
    short_inside = chat("Warm-up: compute 11 + 16 - 4, then rest.", "23")
    got = check([inside, short_inside], evals=[evals])
    assert got[0]["eval"].endswith("eval.jsonl:1") and got[0]["match"] == "13-gram"
    assert got[0]["question"] == LONG_Q
    assert got[1]["eval"].endswith("eval.jsonl:2") and got[1]["match"] == "6-gram"  # the whole short question


def test_keeps_records_sharing_only_short_common_phrases(evals):
    rows = [
        chat("A train leaves the station at noon. Where does it go?", "North."),  # 7 tokens in common
        chat("Compute 11 + 16 - 5", "22"),  # one number differs
        chat("Hi? How are you", "fine"),  # a 2-token question is matched only exactly
    ]
    assert check(rows, evals=[evals]) == [None, None, None]


def test_exact_question_match_even_when_short(evals):
    got = check([chat("hi?", "hello"), {"prompt": "  HI? "}], evals=[evals])
    assert got[0]["match"] == "exact question" and got[1]["match"] == "exact question"
    assert check([chat("hi?", "hello")], evals=[evals], exact_question=False) == [None]


def test_task_suite_test_split():
    from posttrain.data.tasks import make_split

    test_q = make_split("arith", "test", 3)[-1].question
    train_q = make_split("arith", "train", 1)[0].question
    rows = [chat(test_q, "x"), chat(f"{test_q} + 1", "x")]
    got = check(rows, evals=["task:arith"], task_n_per_level=5)
    assert got[0]["eval"].startswith("task arith test level") and got[0]["match"] == "exact question"
    assert got[1]["match"] == "test split"  # the whole split is checked before the sampled n-grams
    assert check(rows, evals=["task:arith"], task_n_per_level=5, whole_split=False)[1]["match"].endswith(
        "-gram"
    )
    assert check([chat(train_q, "x")], evals=["tasks"], task_n_per_level=5) == [None]


def test_whole_split_catches_unsampled_test_questions_and_their_extensions():
    from posttrain.data.tasks import make_split

    sampled = {p.question for p in make_split("arith", "test", 1)}
    unsampled = next(p.question for p in make_split("arith", "test", 60)[30:] if p.question not in sampled)
    rows = [
        chat(unsampled, "x"),
        chat("Two questions.", f"First:\n  {unsampled} + 9\nthen more"),  # begins a line of the reply
        chat(f"Now: {unsampled}", "x"),  # inside a line: only the sampled n-grams look there
    ]
    got = check(rows, evals=["task:arith"], task_n_per_level=1)
    assert got[0]["match"] == "test split" and got[0]["question"] == unsampled
    assert got[0]["eval"].startswith("task arith test level")
    assert got[1]["match"] == "test split" and got[1]["text"].strip() == f"{unsampled} + 9"
    assert got[2] is None
    assert check(rows[:2], evals=["task:arith"], task_n_per_level=1, whole_split=False) == [None, None]


def test_bad_eval_sets(tmp_path, jsonl):
    bad_format = tmp_path / "eval.csv"
    bad_format.write_text("q,a\n1,2\n")
    with pytest.raises(DataError, match="unsupported data file type"):
        build_index(DecontamConfig(evals=[str(bad_format)]))
    no_question = jsonl(
        "chat_eval.jsonl",
        [{"messages": [{"role": "system", "content": "s"}, {"role": "assistant", "content": "a"}]}],
    )
    with pytest.raises(DataError, match="no question") as err:
        build_index(DecontamConfig(evals=[no_question]))
    assert err.value.where.endswith("chat_eval.jsonl:1")
    with pytest.raises(DataError, match="not found"):
        build_index(DecontamConfig(evals=["missing.jsonl"]))
    with pytest.raises(ConfigError, match="unknown task"):
        build_index(DecontamConfig(evals=["task:nope"]))
