"""Traces round-trip to disk; exporters write records the trainers' validator accepts; budget math."""

from __future__ import annotations

import json

import pytest
from search_env import BEST

from posttrain.data.records import detect_kind, validate_record
from posttrain.errors import DataError
from posttrain.search import Budget, Cost, run_search
from posttrain.search.export import assistant_turn, export_preferences, export_prm, export_sft, export_values
from posttrain.search.mcts import MCTSConfig
from posttrain.search.traces import load_results, save_results, summarize


def _check(records, kind):
    assert records, f"no {kind} records"
    for i, rec in enumerate(records):
        assert detect_kind(rec) == kind
        validate_record(rec, kind, where=f"{kind}[{i}]")


@pytest.fixture
def mcts_results(env):
    policy, prm, _, queries = env
    return run_search("mcts", policy, queries, prm, MCTSConfig(n_simulations=6, expand_k=3, value="mix"))


def test_traces_round_trip(tmp_path, mcts_results):
    path = save_results(tmp_path / "runs" / "mcts.jsonl", mcts_results)
    back = load_results(path)
    assert [r.to_dict() for r in back] == [r.to_dict() for r in mcts_results]
    assert isinstance(back[0].cost, Cost) and back[0].cost.policy_calls == mcts_results[0].cost.policy_calls
    ops = {e.op for e in back[0].graph.trace}
    assert {"select", "expand", "evaluate", "backpropagate", "finish"} <= ops
    summary = summarize(back)
    assert summary["answered"] == 3 and summary["cost"]["generated_tokens"] > 0
    (tmp_path / "bad.jsonl").write_text('{"strategy": "x"}\n')
    with pytest.raises(DataError, match="bad.jsonl:1"):
        load_results(tmp_path / "bad.jsonl")


def test_sft_export_keeps_verified_best_paths(mcts_results):
    records = export_sft(mcts_results)
    _check(records, "chat")
    assert len(records) == 3 and [r["messages"][0]["content"] for r in records] == ["Q1", "Q2", "Q3"]
    msg = records[0]["messages"][1]
    assert msg["reasoning_content"] == "b1<step>b2<step>b3" and msg["content"] == "Answer: 7"
    assert export_sft(mcts_results, min_reward=2.0) == []
    everything = export_sft(mcts_results, min_reward=None, paths="all")
    assert len(everything) > len(records)
    dumped = [json.dumps(r, sort_keys=True) for r in everything]
    assert len(set(dumped)) == len(dumped)  # a rollout and a step path with the same text: stored once


def test_prm_and_value_export(mcts_results):
    from posttrain.train.rm_data import _check_stepwise  # what the PRM trainer runs on each row

    prm = export_prm(mcts_results)
    _check(prm, "prompt")
    for i, row in enumerate(prm):
        _check_stepwise(row, f"prm[{i}]")
        assert not any("<step>" in s or "think>" in s for s in row["completions"])
    best = next(r for r in prm if r["final"] == "Answer: 7" and len(r["completions"]) == 3)
    assert best["completions"] == ["b1", "b2", "b3"] and best["metadata"]["ground_truth"] == "7"
    assert best["labels"][2] == pytest.approx(1.0) and best["labels"][0] > 0.5
    hard = export_prm(mcts_results, hard_threshold=0.5)
    assert all(v in (0, 1) for r in hard for v in r["labels"])
    values = export_values(mcts_results)
    _check(values, "prompt_completion")
    assert all(0.0 <= v["value"] <= 1.0 for v in values) and any(v["visits"] > 1 for v in values)


def test_preference_pairs_from_siblings(env):
    policy, _, verifier, queries = env
    results = run_search("best_of_n", policy, queries, verifier, {"n": 4, "select": "verifier"})
    pairs = export_preferences(results)
    _check(pairs, "preference")
    assert all(p["chosen"] == BEST for p in pairs) and len(pairs) == 3
    assert all(p["chosen_score"] > p["rejected_score"] for p in pairs)
    assert export_preferences(results, margin=1.0) == []


def test_assistant_turn_split():
    assert assistant_turn("<think>a<step>b</think>\nAnswer: 3") == [
        {"role": "assistant", "reasoning_content": "a<step>b", "content": "Answer: 3"}
    ]
    assert assistant_turn("just text") == [{"role": "assistant", "content": "just text"}]


def test_budget_allowance_by_hand():
    b = Budget(max_generated_tokens=100, max_total_tokens=150, max_flops=2 * 10 * 120)
    cost = Cost(prompt_tokens=20, generated_tokens=40, flops=2 * 10 * 60)
    # generated: 60 left; total: 150 - 60 - 10 = 80; flops: (2400 - 1200) / 20 - 10 = 50 -> min 50, / 2 sequences
    assert b.allowance(cost, prompt_tokens=10, n_sequences=2, policy_params=10) == 25
    assert Budget().allowance(cost, 10, 2) is None
    assert Budget(max_policy_calls=1).allowance(Cost(policy_calls=1), 0, 1) == 0
    assert Budget(max_scorer_calls=1).can_score(Cost(scorer_calls=1)) is False
    assert Cost(1, 2).add(Cost(3, 4)).to_dict()["total_tokens"] == 10
    with pytest.raises(Exception, match="max_flops"):
        Budget(max_flops=-1)
    json.dumps(Cost().to_dict())
