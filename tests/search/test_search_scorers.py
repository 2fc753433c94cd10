"""Scorers on known paths: verifier, oracle PRM, reward function, trained-RM adapter, judge."""

from __future__ import annotations

import pytest

from posttrain.data.tasks import make_split
from posttrain.errors import DataError
from posttrain.rewards.registry import RewardResult
from posttrain.search import queries_from_problems
from posttrain.search.protocols import ScoreRequest
from posttrain.search.scorers import (
    FunctionScorer,
    JudgeScorer,
    RewardModelScorer,
    RewardScorer,
    TaskStepScorer,
    task_verifier,
)
from posttrain.search.scripted import ScriptedPolicy


@pytest.fixture
def problem():
    return next(p for p in make_split("arith", "test", 5, levels=[2]) if len(p.steps) == 2)


def requests_for(problem):
    meta = queries_from_problems([problem])[0].metadata
    s1, s2 = problem.steps
    good = f"<think>{s1}<step>{s2}</think>\nAnswer: {problem.answer}"
    bad_step = f"<think>{s1}<step>1 + 1 = 3</think>\nAnswer: {problem.answer}"
    partial = f"<think>{s1}<step>"
    return [
        ScoreRequest("p", [f"<think>{s1}", f"{s2}</think>\nAnswer: {problem.answer}"], good, True, meta),
        ScoreRequest(
            "p", [f"<think>{s1}", f"1 + 1 = 3</think>\nAnswer: {problem.answer}"], bad_step, True, meta
        ),
        ScoreRequest("p", [f"<think>{s1}"], partial, False, meta),
    ]


def test_task_verifier_and_oracle_prm(problem):
    reqs = requests_for(problem)
    assert task_verifier(pending=0.5).score(reqs) == [[0.0, 1.0], [0.0, 1.0], [0.5]]
    assert TaskStepScorer().score(reqs) == [[1.0, 1.0], [1.0, 0.0], [1.0]]
    with pytest.raises(DataError, match="ground_truth"):
        task_verifier().score([ScoreRequest("p", ["x"], "x", True, {})])


def test_reward_function_and_model_adapters(problem):
    reqs = requests_for(problem)
    assert RewardScorer("task").score(reqs) == [[0.0, 1.0], [0.0, 1.0], [0.0]]

    def fake_prm(prompts, completions, metadata):
        assert prompts[0] == [{"role": "user", "content": problem.question}]
        return [RewardResult(0.3, {"steps": [0.9, 0.3]}), RewardResult(0.7, {}), 0.2]

    assert RewardModelScorer(fake_prm).score(reqs) == [[0.9, 0.3], [0.0, 0.7], [0.2]]
    assert FunctionScorer(lambda rs: [[1.0] * len(r.steps) for r in rs]).score(reqs[:1]) == [[1.0, 1.0]]


def test_judge_scores_with_one_policy_call(problem):
    policy = ScriptedPolicy(
        {}, rules={"Answer: " + problem.answer: [("yes", 0.0)], "Proposed": [("no", 0.0)]}
    )
    reqs = requests_for(problem)
    assert JudgeScorer(policy).score(reqs) == [[0.0, 1.0], [0.0, 1.0], [0.0]]
    assert len(policy.calls) == 1 and policy.calls[0][0] == 3 and policy.calls[0][1].greedy
