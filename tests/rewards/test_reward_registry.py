"""Reward registry: lookup, per-row dispatch by scorer, combination."""

from __future__ import annotations

import pytest

from posttrain.data.tasks import get_task
from posttrain.errors import ConfigError, DataError
from posttrain.rewards import registry
from posttrain.rewards.registry import RewardResult, combine, get_reward, register_reward, score_batch

GOOD = "<think>2 + 3 = 5</think>\nAnswer: 5"
BAD = "Answer: 6"


@pytest.fixture
def calls():
    """Two throwaway rewards that record each batched call."""
    seen: list[tuple[str, int]] = []
    saved = dict(registry.REWARDS)

    @register_reward("length_chars")
    def length_chars(prompts, completions, metadata):
        seen.append(("length_chars", len(completions)))
        return [float(len(c)) for c in completions]

    @register_reward("const")
    def const(prompts, completions, metadata):
        seen.append(("const", len(completions)))
        return [RewardResult(0.5, {"why": "constant"}) for _ in completions]

    yield seen
    registry.REWARDS.clear()
    registry.REWARDS.update(saved)


def test_mixed_rows_are_grouped_by_scorer_and_keep_their_order(calls):
    rows = [
        ("p0", "abc", {"scorer": "length_chars"}),
        ("p1", GOOD, {"scorer": "format"}),
        ("p2", "x", {"scorer": "const"}),
        ("p3", "hello", {"scorer": "length_chars"}),
        ("p4", BAD, {"scorer": "format"}),
        ("p5", "", {}),  # falls back to the default scorer
    ]
    prompts, completions, metadata = map(list, zip(*rows, strict=True))
    out = score_batch(prompts, completions, metadata, default="const")
    assert [r.score for r in out] == [3.0, 1.0, 0.5, 5.0, 0.0, 0.5]
    assert [r.info["scorer"] for r in out] == [
        "length_chars",
        "format",
        "const",
        "length_chars",
        "format",
        "const",
    ]
    assert out[4].why == "needs exactly one <think> and one </think>"
    # one batched call per scorer
    assert sorted(calls) == [("const", 2), ("length_chars", 2)]


def test_task_names_dispatch_to_the_task_verifier():
    problem = get_task("arith").generate(__import__("random").Random(0), 1)
    record = problem.prompt_record()
    right, wrong = problem.response(), "<think>x</think>\nAnswer: 99999"
    out = score_batch([record["prompt"]] * 2, [right, wrong], [record["metadata"]] * 2)
    assert [r.score for r in out] == [1.0, 0.0]
    assert out[0].info["scorer"] == "arith"


def test_unknown_scorer_lists_valid_names_with_a_suggestion():
    with pytest.raises(ConfigError) as err:
        score_batch(["p"], ["c"], [{"scorer": "fromat"}])
    text = err.value.render()
    assert "unknown reward 'fromat'" in text and "did you mean 'format'?" in text
    assert "math" in text and "code" in text and "arith" in text


def test_missing_scorer_and_bad_outputs_are_errors(calls):
    with pytest.raises(DataError, match="row has no scorer"):
        score_batch(["p"], ["c"], [{}])
    with pytest.raises(DataError, match="1 prompts, 2 completions"):
        score_batch(["p"], ["a", "b"], [{}, {}], default="const")

    @register_reward("broken")
    def broken(prompts, completions, metadata):
        return [1.0]

    with pytest.raises(ConfigError, match="returned 1 results for 2 rows"):
        score_batch(["p", "q"], ["a", "b"], [{}, {}], default="broken")
    with pytest.raises(ConfigError, match="already registered"):
        register_reward("const")(broken)


def test_combine_is_a_weighted_sum_of_parts(calls):
    reward = combine({"length_chars": 0.5, "format": 2.0, "const": -1.0})
    out = reward(["p", "q"], [GOOD, "abcd"], [{}, {}])
    # GOOD: 0.5 * 33 + 2 * 1 - 0.5 ; "abcd": 0.5 * 4 + 2 * 0 - 0.5
    assert [r.score for r in out] == [pytest.approx(0.5 * len(GOOD) + 2.0 - 0.5), pytest.approx(1.5)]
    assert out[1].info["parts"] == {"length_chars": 4.0, "format": 0.0, "const": 0.5}
    with pytest.raises(ConfigError, match="unknown reward"):
        combine({"nope": 1.0})
    with pytest.raises(ConfigError, match="finite number"):
        combine({"const": float("nan")})


def test_builtin_overlong_and_math_rewards():
    over = get_reward("overlong")(
        ["p"] * 2,
        ["a", "b"],
        [
            {"completion_tokens": 90, "max_tokens": 100, "overlong_buffer": 20},
            {"completion_tokens": 50, "max_tokens": 100},
        ],
    )
    assert [r.score for r in over] == [-0.5, 0.0]
    with pytest.raises(DataError, match="completion_tokens"):
        get_reward("overlong")(["p"], ["a"], [{"max_tokens": 3}])
    pytest.importorskip("math_verify")
    out = get_reward("math")(
        ["p"] * 3,
        [r"so \boxed{\frac{1}{2}}", "Answer: 0.4", "thinking..."],
        [
            {"ground_truth": "0.5"},
            {"ground_truth": r"\boxed{2/5}"},
            {"ground_truth": "1"},
        ],
    )
    assert [r.score for r in out] == [1.0, 1.0, 0.0]
    assert out[0].info["answer"] == r"\frac{1}{2}"
