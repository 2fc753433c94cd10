"""Record kinds: detection, normalisation and the error for each bad input."""

from __future__ import annotations

import pytest

from posttrain.data.records import detect_kind, validate_record
from posttrain.errors import DataError

CHAT = {
    "messages": [
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "", "tool_calls": [{"name": "f"}]},
        {"role": "tool", "content": "ok"},
        {"role": "assistant", "content": "Hello", "reasoning_content": None},
    ]
}


@pytest.mark.parametrize(
    ("row", "kind"),
    [
        (CHAT, "chat"),
        ({"prompt": "a", "completion": "b"}, "prompt_completion"),
        ({"prompt": "a", "chosen": "b", "rejected": "c"}, "preference"),
        ({"prompt": "a", "responses": ["b", "c"], "ranking": [1, 0]}, "ranking"),
        ({"prompt": "a", "metadata": {"scorer": "math"}}, "prompt"),
    ],
)
def test_detect_kind(row, kind):
    assert detect_kind(row) == kind
    validate_record(row, kind, "f.jsonl:1")


def test_normalisation():
    chat = validate_record(CHAT, "chat", "w")
    assert "reasoning_content" not in chat["messages"][3]  # nulls from Arrow are dropped
    pref = validate_record({"prompt": "Q", "chosen": "A", "rejected": "B", "id": 7}, "preference", "w")
    assert pref == {
        "prompt": [{"role": "user", "content": "Q"}],
        "chosen": [{"role": "assistant", "content": "A"}],
        "rejected": [{"role": "assistant", "content": "B"}],
        "id": 7,
    }
    rank = validate_record(
        {"prompt": "Q", "responses": ["A", "B", "C"], "ranking": [2, 0, 1]}, "ranking", "w"
    )
    assert rank["responses"][2] == [{"role": "assistant", "content": "C"}]
    assert validate_record({"prompt": "Q"}, "prompt", "w")["metadata"] == {}


@pytest.mark.parametrize(
    ("row", "kind", "expected"),
    [
        ({"messages": "hi"}, "chat", "messages: expected a non-empty list"),
        (
            {"messages": [{"role": "user", "content": 3}]},
            "chat",
            r"messages\[0\].content: expected a string, got int",
        ),
        ({"messages": [{"role": "robot", "content": "x"}]}, "chat", r"messages\[0\].role: expected one of"),
        (
            {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": " "}]},
            "chat",
            r"messages\[1\].content: empty assistant turn",
        ),
        ({"messages": [{"role": "user", "content": "Hi"}]}, "chat", "no assistant turn"),
        ({"prompt": "Q"}, "prompt_completion", "completion: missing required field"),
        (
            {"prompt": 5, "completion": "A"},
            "prompt_completion",
            "prompt: expected a string or a list of messages",
        ),
        ({"prompt": "Q", "chosen": "A", "rejected": ""}, "preference", "rejected: empty response"),
        (
            {"prompt": "Q", "responses": ["A", "B"], "ranking": [0, 0]},
            "ranking",
            "ranking: expected a permutation",
        ),
        (
            {"prompt": "Q", "responses": ["A"], "ranking": [0]},
            "ranking",
            "responses: expected a list of at least 2",
        ),
        ({"prompt": "Q", "metadata": {"scorer": 1}}, "prompt", "metadata.scorer: expected a scorer name"),
        ({"prompt": "Q"}, "rl", "unknown record kind"),
    ],
)
def test_errors_name_record_and_field(row, kind, expected):
    with pytest.raises(DataError, match=expected) as e:
        validate_record(row, kind, "train.jsonl:12")
    assert str(e.value).startswith("train.jsonl:12: ")


def test_empty_assistant_fix_and_unknown_keys():
    with pytest.raises(DataError) as e:
        validate_record(
            {"messages": [{"role": "user", "content": "a"}, {"role": "assistant"}]}, "chat", "f:2"
        )
    assert "drop the row or fill" in e.value.fix
    with pytest.raises(DataError, match=r"cannot tell the record kind from its keys \['text'\]"):
        detect_kind({"text": "x"}, "f:3")
