"""Preference pairs from the task suite: chosen verified correct, rejected rejected, deterministic."""

from __future__ import annotations

from collections import Counter

import pytest

from posttrain.data.records import validate_record
from posttrain.data.tasks import get_task
from posttrain.data.tasks.pairs import make_pairs
from posttrain.errors import ConfigError


@pytest.mark.parametrize("task", ["arith", "arith_hard", "countdown", "sort"])
def test_chosen_verifies_and_rejected_does_not(task):
    records = make_pairs(task, "train", 6, seed=1, step_sep="<step>")
    checker = get_task(task)
    assert len(records) == 6 * len(checker.levels)
    for r in records:
        validate_record(r, "preference", "test")
        chosen, rejected = r["chosen"][0]["content"], r["rejected"][0]["content"]
        truth = r["metadata"]["ground_truth"]
        assert chosen != rejected
        assert checker.verify(chosen, truth)
        assert not checker.verify(rejected, truth)


def test_deterministic_and_train_test_disjoint():
    a = make_pairs("arith", "train", 10, seed=3)
    assert a == make_pairs("arith", "train", 10, seed=3)
    assert a != make_pairs("arith", "train", 10, seed=4)
    test_q = {r["prompt"][0]["content"] for r in make_pairs("arith", "test", 10, seed=3)}
    assert not test_q & {r["prompt"][0]["content"] for r in a}


def test_malformed_share_controls_rejection_kinds():
    def kinds(m):
        return Counter(r["metadata"]["rejected_kind"] for r in make_pairs("sort", "train", 20, malformed=m))

    assert set(kinds(0.0)) == {"wrong"}
    assert set(kinds(1.0)) == {"no_answer", "truncated"}
    mixed = kinds(0.5)
    assert mixed["wrong"] and mixed["no_answer"] + mixed["truncated"]
    with pytest.raises(ConfigError):
        make_pairs("sort", "train", 2, malformed=1.5)


def test_wrong_rejections_carry_their_first_wrong_step():
    for r in make_pairs("arith", "train", 10, malformed=0.0):
        k = r["metadata"]["first_wrong_step"]
        chosen_steps = r["chosen"][0]["content"].split("\n")
        rejected_steps = r["rejected"][0]["content"].split("\n")
        assert chosen_steps[:k] == rejected_steps[:k]  # identical up to the slip


def test_pairs_from_sampled_completions_use_the_verifier():
    problem = make_split_problem()
    good = problem.response("\n")
    bad = good.replace(f"Answer: {problem.answer}", "Answer: 999")
    (pair,) = make_pairs_from([good, bad, good, "garbage"], problem)
    assert pair["chosen"][0]["content"] == good and pair["rejected"][0]["content"] == bad
    assert make_pairs_from([good, good], problem) == []  # no preference signal
    assert make_pairs_from([bad, "garbage"], problem) == []
    assert len(make_pairs_from([good, bad, good + " ", "garbage"], problem, max_pairs=5)) == 2


def make_split_problem():
    from posttrain.data.tasks import make_split

    return make_split("arith", "train", 1, seed=0, levels=[2])[0]


def make_pairs_from(completions, problem, max_pairs=1):
    from posttrain.data.tasks.pairs import pairs_from_completions

    return pairs_from_completions("arith", problem, completions, max_pairs)
