"""Mixing by ratios and token budgets: exact shares, determinism, uniform draws, errors."""

from __future__ import annotations

import random

import pytest

from posttrain.data.quality.mix import SourceConfig, budget_counts, mix, mix_mode, ratio_counts, select
from posttrain.errors import ConfigError, DataError


def test_ratio_counts_hand_computed():
    assert ratio_counts([100, 100, 100], [0.5, 0.3, 0.2], total=10) == [5, 3, 2]
    assert ratio_counts([100, 100, 100], [1, 1, 1], total=10) == [4, 3, 3]  # largest remainder
    assert ratio_counts([50, 1000], [1, 1]) == [50, 50]  # default total: as many as the sources allow
    assert ratio_counts([10, 10], [1, 0]) == [10, 0]


def test_mix_shares_within_one_percent_on_100k_records():
    sizes, ratios = [60_000, 50_000, 40_000], [0.5, 0.3, 0.2]
    streams = [[(s, j) for j in range(n)] for s, n in enumerate(sizes)]
    counts = ratio_counts(sizes, ratios, total=100_000)
    out = list(mix(streams, sizes, counts, seed=0))
    assert len(out) == 100_000
    for s, r in enumerate(ratios):
        assert abs(sum(1 for src, _ in out if src == s) / len(out) - r) < 0.01
    # shares hold in every stretch of the output too (sources are interleaved, not concatenated)
    head = out[:1000]
    assert abs(sum(1 for src, _ in head if src == 0) / 1000 - 0.5) < 0.01
    # uniform draw: the kept indices of source 0 spread over the whole source
    mean_index = sum(j for src, j in out if src == 0) / counts[0]
    assert abs(mean_index - sizes[0] / 2) < 0.02 * sizes[0]


def test_mix_is_deterministic_by_seed():
    def run(seed):
        return list(mix([iter(range(1000)), iter(range(1000, 2000))], [1000, 1000], [300, 200], seed))

    assert run(0) == run(0)
    assert run(0) != run(1)
    assert sorted(run(0)) == sorted(set(run(0)))  # no record drawn twice


def test_select_takes_exactly_k():
    rng = random.Random(3)
    for n, k in [(10, 0), (10, 10), (100, 37)]:
        got = list(select(range(n), n, k, rng))
        assert len(got) == k and got == sorted(got)


def test_budget_counts():
    assert budget_counts([100, 10], [1000, 500], [500, 500]) == [50, 10]
    with pytest.raises(DataError, match="larger than inputs\\[1\\]") as err:
        budget_counts([100, 10], [1000, 500], [500, 501])
    assert err.value.where == "inputs[1].tokens"


def test_bad_ratios():
    with pytest.raises(ConfigError, match="sum to 0") as err:
        ratio_counts([10, 10], [0, 0])
    assert err.value.where == "inputs[*].ratio"
    with pytest.raises(ConfigError, match=">= 0"):
        ratio_counts([10, 10], [1, -1])
    with pytest.raises(DataError, match="asks 15 records of inputs\\[0\\]"):
        ratio_counts([10, 100], [0.5, 0.5], total=30)


def test_mix_mode():
    assert mix_mode([SourceConfig("a"), SourceConfig("b")]) is None
    assert mix_mode([SourceConfig("a", ratio=1), SourceConfig("b", ratio=2)]) == "ratio"
    assert mix_mode([SourceConfig("a", tokens=1)]) == "tokens"
    with pytest.raises(ConfigError, match="inputs\\[1\\] has no ratio"):
        mix_mode([SourceConfig("a", ratio=1), SourceConfig("b")])
    with pytest.raises(ConfigError, match="ratios and token budgets"):
        mix_mode([SourceConfig("a", ratio=1), SourceConfig("b", tokens=3)])
