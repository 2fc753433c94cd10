from __future__ import annotations

import random

import pytest

from posttrain.data.tasks.expr import (
    Node,
    parse_step,
    random_tree,
    reachable,
    reduce_all,
    render,
    render_tokens,
    safe_eval,
    tokenize,
)


def test_reduction_order_innermost_first_and_precedence():
    # hand-computed: (17 + 8) * 2 - 19 = 31
    assert reduce_all(tokenize("(17 + 8) * 2 - 19")) == [
        (17, "+", 8, 25),
        (25, "*", 2, 50),
        (50, "-", 19, 31),
    ]
    assert reduce_all(tokenize("2 + 3 * 4 - 1")) == [(3, "*", 4, 12), (2, "+", 12, 14), (14, "-", 1, 13)]
    assert reduce_all(tokenize("10 - (2 - (5 - 4))")) == [(5, "-", 4, 1), (2, "-", 1, 1), (10, "-", 1, 9)]
    assert reduce_all(tokenize("7")) == []


def test_render_minimal_parentheses_keeps_value():
    assert render(Node("*", Node("+", 17, 8), 2)) == "(17 + 8) * 2"
    assert render(Node("-", 10, Node("-", 2, 1))) == "10 - (2 - 1)"
    assert render(Node("-", Node("-", 10, 2), 1)) == "10 - 2 - 1"
    assert render(Node("+", 1, Node("*", 2, 3))) == "1 + 2 * 3"
    rng = random.Random(0)
    for _ in range(300):
        tree = random_tree(rng, rng.randint(1, 6), ("+", "-", "*"), 0, 9)
        text = render(tree)
        assert render_tokens(tokenize(text)) == text
        steps = reduce_all(tokenize(text))
        value = steps[-1][3] if steps else int(text)
        assert safe_eval(text)[0] == value == eval(text)  # trusted, generated text only


def test_parse_step():
    assert parse_step("11 + 16 = 27") == (11, "+", 16, 27)
    assert parse_step(" 3 - -5=8 ") == (3, "-", -5, 8)
    assert parse_step("11 + 16 = ") is None
    assert parse_step("11 / 16 = 0") is None


@pytest.mark.parametrize(
    "text",
    [
        "__import__('os')",
        "x + 1",
        "2 ** 3",
        "-3 + 4",
        "1.5 + 2",
        "abs(3)",
        "(1).real",
        "True + 1",
        "3 +",
        "1 // 2",
        "9" * 201,
    ],
)
def test_safe_eval_rejects(text):
    assert safe_eval(text) is None


def test_safe_eval_values_and_literals():
    assert safe_eval("(3 + 4) * 2") == (14, [3, 4, 2])
    assert safe_eval(" 7 - 9 ") == (-2, [7, 9])


def test_reachable():
    assert reachable([2, 3, 7], 23)  # 3 * 7 + 2
    assert reachable([2, 3, 7], 1)  # 7 - 3 * 2
    assert not reachable([1, 1], 5)
    assert not reachable([2, 3, 7], 100)
