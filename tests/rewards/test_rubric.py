"""Rubric: criteria from rewards, regexes and a judge; weighted sum and weighted mean."""

from __future__ import annotations

import pytest

from posttrain.errors import ConfigError
from posttrain.rewards.rubric import Criterion, Rubric

GOOD = "<think>2 + 3 = 5</think>\nAnswer: 5"
PLAIN = "The answer is 5, sorry!"


def judge(prompts, completions, question):
    """A stand-in judge: 0.25 per exclamation mark, capped at 1."""
    assert question == "Is it enthusiastic?"
    return [min(1.0, 0.25 * c.count("!")) for c in completions]


CRITERIA = [
    Criterion("format", weight=2.0, reward="format"),
    Criterion("polite", weight=1.0, pattern=r"\bsorry\b", negate=True),
    Criterion("mentions_5", weight=0.5, pattern=r"\b5\b"),
    Criterion("enthusiasm", weight=4.0, question="Is it enthusiastic?"),
]


def test_weighted_sum_hand_values():
    out = Rubric(CRITERIA, judge=judge).score(["p", "p"], [GOOD, PLAIN], [{}, {}])
    # GOOD: 2*1 + 1*1 + 0.5*1 + 4*0 = 3.5 ; PLAIN: 2*0 + 1*0 + 0.5*1 + 4*0.25 = 1.5
    assert [r.score for r in out] == [3.5, 1.5]
    assert out[1].info["parts"] == {"format": 0.0, "polite": 0.0, "mentions_5": 1.0, "enthusiasm": 0.25}
    assert out[0].why.startswith("weighted_sum: format=1")


def test_mean_is_the_weighted_mean():
    rubric = Rubric(CRITERIA, aggregate="mean", judge=judge)
    out = rubric(["p", "p"], [GOOD, PLAIN], [{}, {}])  # usable as a reward function
    assert [r.score for r in out] == [pytest.approx(3.5 / 7.5), pytest.approx(1.5 / 7.5)]
    equal = Rubric([Criterion("a", pattern="x"), Criterion("b", pattern="y")], aggregate="mean")
    assert [r.score for r in equal.score(["p"] * 3, ["xy", "x", ""], [{}] * 3)] == [1.0, 0.5, 0.0]


@pytest.mark.parametrize(
    ("criteria", "kwargs", "message"),
    [
        ([], {}, "at least one criterion"),
        ([Criterion("a")], {}, "exactly one of reward, pattern or question"),
        ([Criterion("a", reward="format", pattern="x")], {}, "exactly one of"),
        ([Criterion("a", pattern="(")], {}, "bad regex"),
        ([Criterion("a", reward="formt")], {}, "did you mean 'format'"),
        ([Criterion("a", question="ok?")], {}, "has no judge"),
        ([Criterion("a", pattern="x"), Criterion("a", pattern="y")], {}, "names repeat"),
        ([Criterion("a", pattern="x", weight=0.0)], {"aggregate": "mean"}, "positive total weight"),
        ([Criterion("a", pattern="x")], {"aggregate": "median"}, "unknown aggregate"),
    ],
)
def test_invalid_rubrics_are_config_errors(criteria, kwargs, message):
    with pytest.raises(ConfigError) as err:
        Rubric(criteria, **kwargs)
    assert message in err.value.render()
