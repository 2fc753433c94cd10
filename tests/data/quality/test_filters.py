"""Each heuristic filter on hand-made records, with hand-computed ratios."""

from __future__ import annotations

import pytest
from quality_helpers import chat, make_item

from posttrain.data.quality.filters import (
    FilterConfig,
    apply_filters,
    empty_turn,
    repetition_ratio,
    symbol_ratio,
    unclosed_think,
)
from posttrain.errors import ConfigError


def run(rows, **cfg):
    items = [make_item(r, where=f"t.jsonl:{i + 1}") for i, r in enumerate(rows)]
    count = lambda texts: [len(t.split()) for t in texts]  # noqa: E731 - a whitespace "tokenizer"
    out = list(apply_filters(items, FilterConfig(**cfg), count_tokens=count))
    return [(it.removed.rule, it.removed.evidence) if it.removed else None for it in out]


def test_symbol_ratio_hand_computed():
    assert symbol_ratio("abc def") == 0.0
    assert symbol_ratio("Hi, there (ok)!") == 0.0  # plain punctuation is not a symbol
    assert symbol_ratio("ab#$") == pytest.approx(0.5)  # 2 of 4 non-space chars
    assert symbol_ratio("x = 1 + 2") == pytest.approx(2 / 5)
    assert symbol_ratio("   ") == 0.0


def test_repetition_ratio_hand_computed():
    assert repetition_ratio("a b c d e", 3) == 0.0  # 3 distinct trigrams of 3
    # "a b a b a b": trigrams (a b a), (b a b), (a b a), (b a b) -> 2 distinct of 4
    assert repetition_ratio("a b a b a b", 3) == pytest.approx(0.5)
    assert repetition_ratio("A b A B", 1) == pytest.approx(0.5)  # lower-cased: {a, b} of 4
    assert repetition_ratio("too short", 3) == 0.0


def test_empty_and_whitespace_turns():
    row = {
        "messages": [
            {"role": "system", "content": " \n\t"},
            {"role": "user", "content": "hi"},
            {"role": "assistant", "content": "hello"},
        ]
    }
    data = make_item(row).data
    assert empty_turn(data, "chat") == "messages[0]"
    assert empty_turn(make_item(chat("hi", "hello")).data, "chat") is None
    assert empty_turn(make_item({"prompt": "  ", "completion": "x"}).data, "prompt_completion") == "prompt[0]"
    assert run([row, chat("hi", "hello")]) == [
        ("invalid", {"check": "empty_turn", "field": "messages[0]"}),
        None,
    ]


def test_unclosed_think_block():
    ok = make_item(chat("q", "<think>a</think>b")).data
    open_ = make_item(chat("q", "<think>a</think> again <think>still thinking")).data
    assert unclosed_think(ok, "chat") is None
    assert unclosed_think(open_, "chat") == "messages[1]"
    # a user turn may quote a think tag; only assistant turns count
    assert unclosed_think(make_item(chat("<think> in a question", "fine")).data, "chat") is None
    assert run([chat("q", "<think>never closed")])[0][1]["check"] == "unclosed_think"


def test_length_min_max_tokens():
    rows = [chat("one", "two"), chat("one two three", "four five"), chat("a b c d e f", "g h i j")]
    got = run(rows, min_tokens=3, max_tokens=6)
    assert got[0] == ("length", {"tokens": 2, "min_tokens": 3})
    assert got[1] is None
    assert got[2] == ("length", {"tokens": 10, "max_tokens": 6})


def test_language_filter_with_py3langid():
    rows = [
        chat("What is the capital of France?", "The capital of France is Paris, a large city."),
        chat(
            "Was ist die Hauptstadt von Frankreich?",
            "Die Hauptstadt von Frankreich ist Paris, eine große Stadt.",
        ),
        chat("2+2?", "4"),  # too few letters to tell: kept
    ]
    got = run(rows, languages=["en"])
    assert got[0] is None and got[2] is None
    assert got[1][0] == "language" and got[1][1]["language"] == "de" and got[1][1]["probability"] > 0.5


def test_symbols_and_repetition_rules():
    rows = [
        chat("fine question here", "a normal answer"),
        chat("q", "@@## ~~|| ^^"),
        chat("q", "go go go go go go go go"),
    ]
    got = run(rows, max_symbol_ratio=0.3, max_repetition=0.5)
    assert got[0] is None
    assert got[1][0] == "symbols" and got[1][1]["ratio"] == round(10 / 11, 4)  # the user "q" is a letter
    assert got[2] == ("repetition", {"field": "messages[1]", "ratio": 0.8333, "max_repetition": 0.5})


def test_removed_items_pass_through_untouched():
    item = make_item(chat("q", "<think>open"))
    item.drop("exact_dup", duplicate_of="x")
    (out,) = apply_filters([item], FilterConfig())
    assert out.removed.rule == "exact_dup"


def test_bad_filter_settings():
    with pytest.raises(ConfigError, match="max_symbol_ratio"):
        FilterConfig(max_symbol_ratio=2.0).validate()
    with pytest.raises(ConfigError, match="tokenizer"):
        list(apply_filters([], FilterConfig(min_tokens=1)))
