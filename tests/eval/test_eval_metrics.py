"""Evaluation metrics against hand-computed values."""

from __future__ import annotations

import math
from itertools import combinations

import numpy as np
import pytest

from posttrain.errors import ConfigError
from posttrain.eval.metrics import (
    accuracy,
    bootstrap_ci,
    breakdown,
    maj_at_k,
    mean_with_ci,
    pass_at_k,
    problem_values,
    summarize,
)


def test_pass_at_k_hand_values():
    assert pass_at_k(5, 2, 2) == pytest.approx(0.7)  # 1 - C(3,2)/C(5,2) = 1 - 3/10
    assert pass_at_k(5, 2, 1) == pytest.approx(0.4)  # pass@1 = c/n
    assert pass_at_k(10, 3, 4) == pytest.approx(1 - math.comb(7, 4) / math.comb(10, 4))
    assert pass_at_k(5, 0, 3) == 0.0
    assert pass_at_k(5, 3, 3) == 1.0  # n - c < k: every draw of 3 holds a correct one
    assert pass_at_k(200, 7, 100) == pytest.approx(1 - math.comb(193, 100) / math.comb(200, 100))


def test_pass_at_k_is_the_draw_without_replacement_probability():
    correct = [1, 0, 0, 1, 0, 0]
    n, c = len(correct), sum(correct)
    for k in range(1, n + 1):
        draws = list(combinations(correct, k))
        exact = sum(any(d) for d in draws) / len(draws)
        assert pass_at_k(n, c, k) == pytest.approx(exact)


def test_biased_estimator_differs():
    # 1 - (1 - c/n)^k samples with replacement: it underestimates, and never reaches 1 when
    # the draw of k without replacement cannot miss.
    biased = 1 - (1 - 2 / 5) ** 2
    assert biased == pytest.approx(0.64)
    assert pass_at_k(5, 2, 2) - biased == pytest.approx(0.06)
    biased_high = 1 - (1 - 4 / 5) ** 2
    assert pass_at_k(5, 4, 2) == 1.0 and biased_high == pytest.approx(0.96)


def test_k_greater_than_n_is_a_config_error():
    with pytest.raises(ConfigError, match=r"pass@8 needs 1 <= k <= n, but n = 4"):
        pass_at_k(4, 1, 8)
    with pytest.raises(ConfigError, match="maj@3"):
        maj_at_k(["1", "2"], [True, False], 3)


def test_maj_at_k_majority_and_ties():
    # clear majority: "7" twice (wrong), "5" once (right)
    assert maj_at_k(["7", "5", "7"], [False, True, False], 3) == 0.0
    # only the first k samples vote
    assert maj_at_k(["5", "7", "7", "7"], [True, False, False, False], 1) == 1.0
    # tie 1-1: the answer seen first wins, whichever is correct
    assert maj_at_k(["5", "7"], [True, False], 2) == 1.0
    assert maj_at_k(["7", "5"], [False, True], 2) == 0.0
    # tie 2-2: first occurrence of "7" (index 1) comes before "5" (index 2)
    assert maj_at_k([None, "7", "5", "5", "7"], [False, False, True, True, False], 5) == 0.0
    # None never votes; no answers at all scores 0
    assert maj_at_k([None, None, "5"], [False, False, True], 3) == 1.0
    assert maj_at_k([None, None], [False, False], 2) == 0.0


def test_bootstrap_interval_covers_a_known_mean():
    rng = np.random.default_rng(123)
    hits, trials = 0, 200
    for t in range(trials):
        draw = rng.binomial(1, 0.3, size=150)
        lo, hi = bootstrap_ci(draw, n_boot=500, seed=t)
        assert lo <= draw.mean() <= hi
        hits += lo <= 0.3 <= hi
    assert 0.88 <= hits / trials <= 0.99  # nominal 95% (percentile bootstrap runs a little short)


def test_bootstrap_is_seeded_and_vectorised_equals_loop():
    x = np.arange(20, dtype=float) ** 1.5
    assert bootstrap_ci(x, seed=3) == bootstrap_ci(x, seed=3)
    idx = np.random.default_rng(3).integers(0, x.size, size=(1000, x.size))
    loop = [np.mean([x[j] for j in row]) for row in idx]
    assert bootstrap_ci(x, seed=3) == pytest.approx(tuple(np.quantile(loop, [0.025, 0.975])))
    assert math.isnan(bootstrap_ci([])[0])
    assert bootstrap_ci([2.0, 2.0, 2.0]) == (2.0, 2.0)


def test_problem_values_and_summary():
    row = problem_values(
        [True, False, True, False], [1, 0, 1, 0.5], [3, 5, 4, 8], ["a", "b", "a", None], [1, 2]
    )
    assert row["accuracy"] == 0.5 and row["mean_reward"] == pytest.approx(0.625)
    assert row["pass@2"] == pytest.approx(1 - 1 / 6) and row["maj@2"] == 1.0
    assert row["response_length"] == 5.0 and row["tokens_per_problem"] == 20.0
    no_answers = problem_values([True], [1.0], [4], [None], [1])
    assert "maj@1" not in no_answers
    summary = summarize([row, no_answers])
    assert summary["accuracy"]["value"] == pytest.approx(0.75) and summary["accuracy"]["n"] == 2
    assert summary["maj@1"]["n"] == 1
    assert accuracy([]) != accuracy([])  # NaN


def test_breakdown_by_level_and_tags():
    items = [{"level": 1, "tags": ["a", "b"], "ok": 1.0}, {"level": 1, "tags": ["b"], "ok": 0.0},
             {"level": 2, "tags": [], "ok": 1.0}]  # fmt: skip
    by_level = breakdown(items, lambda r: r["level"], lambda r: {"accuracy": r["ok"]})
    assert by_level["1"]["accuracy"]["value"] == 0.5 and by_level["2"]["accuracy"]["n"] == 1
    by_tag = breakdown(items, lambda r: r["tags"], lambda r: {"accuracy": r["ok"]})
    assert sorted(by_tag) == ["a", "b"] and by_tag["b"]["accuracy"]["n"] == 2
    assert mean_with_ci([1.0, 0.0])["value"] == 0.5
