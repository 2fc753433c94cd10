"""bench/distill_compare.py: the validation set settings are chosen on never meets the demonstrations
or the test split, and the token classes of the diagnosis are the ones a reader would mark by hand."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest


@pytest.fixture(scope="module")
def bench():
    path = Path(__file__).resolve().parents[2] / "bench" / "distill_compare.py"
    spec = importlib.util.spec_from_file_location("distill_compare_bench", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_result_digits_are_those_after_equals_and_answer(bench):
    pieces = ["<think>", "\n", "5", " +", " ", "1", " =", " ", "6", "<step>", "6", " +", " ", "1", "2",
              " =", " ", "1", "8", "\n", "</think>", "\n", "\n", "Answer", ":", " ", "1", "8", "<|im_end|>"]  # fmt: skip
    marked = [p for p, m in zip(pieces, bench.result_digit_mask(pieces), strict=True) if m]
    assert marked == ["6", "1", "8", "1", "8"]


def test_validation_set_is_unseen_train_questions(bench):
    from posttrain.data.tasks.split import make_split

    val = bench.validation_problems(40, n_demos=200)
    demos = bench.demo_questions(200)
    test = {p.question for lv in (1, 2, 3, 4) for p in make_split("arith_mag", "test", 300, levels=[lv])}
    questions = [p.question for p in val]
    assert len(questions) == len(set(questions)) and not set(questions) & (demos | test)
    per_level = {lv: sum(p.level == lv for p in val) for lv in (1, 2, 3, 4)}
    assert per_level[3] == per_level[4] == 40 and per_level[2] == 40 and 0 < per_level[1] <= 40
