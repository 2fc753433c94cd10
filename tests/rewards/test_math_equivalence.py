"""Math equivalence through math-verify in worker processes, its timeout, and the fallback."""

from __future__ import annotations

import time

import pytest

from posttrain.errors import BackendUnavailable
from posttrain.rewards import math_verify as mv
from posttrain.rewards.math_verify import MathVerifier, math_equal_batch, simple_equal

pytest.importorskip("math_verify")

PAIRS = [  # (gold, prediction, equivalent)
    ("1/2", "0.5", True),
    (r"\frac{1}{2}", "0.5", True),
    ("0.5", r"\frac12", True),
    (r"\frac{\sqrt{2}}{2}", r"\frac{1}{\sqrt{2}}", True),
    ("{1, -2}", "-2, 1", True),
    (r"\{1,-2\}", "1, -2", True),
    ("-3", "-3", True),
    ("-3", "3", False),
    ("{1, -2}", "1, 2", False),
    ("42", "41", False),
]


@pytest.fixture(scope="module")
def verifier():
    # 3 s per item: generous for sympy's first parse on a loaded 2-core machine, still a bounded hang.
    with MathVerifier(timeout_s=3.0, workers=2) as v:
        v.equal_batch(["1", "2"], ["1", "2"])  # warm both workers before any timing-sensitive check
        yield v


def test_equivalences_and_a_wrong_answer(verifier):
    got = verifier.equal_batch([g for g, _, _ in PAIRS], [p for _, p, _ in PAIRS])
    assert [ok for ok, _ in got] == [want for _, _, want in PAIRS]
    assert got[0][1] == "equivalent" and got[-1][1] == "not equivalent"


def test_missing_prediction_scores_false_without_a_worker(verifier):
    assert verifier.equal_batch(["1", "2"], [None, "  "]) == [(False, "no answer"), (False, "no answer")]


def test_pathological_answer_costs_one_timeout_not_a_hang(verifier):
    verifier.equal_batch(["1"], ["1"])  # workers are up
    start = time.monotonic()
    got = verifier.equal_batch(["9^{9^{9^{9}}}", "2", "1/4"], ["1", "2", "0.25"])
    elapsed = time.monotonic() - start
    assert got[0] == (False, "timeout after 3 s")
    assert got[1][0] and got[2][0]  # the other items still got their verdicts
    assert elapsed < 3.0 + 6.0
    # the stuck worker was replaced: the pool still answers
    assert verifier.equal_batch(["3/4"], ["0.75"]) == [(True, "equivalent")]


def test_simple_fallback_without_math_verify(monkeypatch):
    assert simple_equal("1/2", "0.5") and simple_equal(r"\frac{1}{2}", "0.5")
    assert simple_equal("{1, -2}", "-2, 1") and simple_equal("-3", "-3")
    assert not simple_equal("-3", "3") and not simple_equal("{1, -2}", "{1, 2}")
    monkeypatch.setattr(mv, "math_verify_installed", lambda: False)
    assert math_equal_batch(["1/2", "2"], ["0.5", None]) == [(True, "simple"), (False, "no answer")]
    with pytest.raises(BackendUnavailable, match="math-verify is not installed") as err:
        MathVerifier()
    assert "[math]" in err.value.render()
