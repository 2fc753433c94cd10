"""Compute-optimal allocation: difficulty from a probe, one plan per bin, honest costs and budgets.

Scripted prompts of three difficulties (probe of 4 chains at T > 0, which enumerates options):

- ``E``: one possible chain, answer 4 -> answers 4,4,4,4: difficulty 0, bin 0.
- ``M``: chains answering 3, 3, 9 -> draws 3,3,9,3: agreement .75, difficulty .25, bin 1.
- ``Q1`` (search_env): draws a1-a2 (5), b1-b2-b3 (7), c1-c2 (8), a1-a3 (6): difficulty .75, bin 2.
"""

from __future__ import annotations

import pytest
from search_env import A1, A2, A3, BEST, C1, C2, PRM, scripted_tree

from posttrain.data.tasks import extract_answer
from posttrain.errors import ConfigError
from posttrain.search import Budget, Cost, run_search
from posttrain.search.budget import remaining, tighter
from posttrain.search.compute_optimal import (
    BinPlan,
    ComputeOptimalConfig,
    agreement,
    bin_of,
    calibrate,
    choose_plans,
    difficulty,
    plan_config,
    total_probe_cost,
)
from posttrain.search.protocols import Query
from posttrain.search.scripted import ScriptedPolicy, ScriptedScorer

E_CHAIN = "<think>e</think>\nAnswer: 4"
M1, M2, M3 = "<think>m1</think>\nAnswer: 3", "<think>m2</think>\nAnswer: 3", "<think>m3</think>\nAnswer: 9"
H_PROBE = [A1 + A2, BEST, C1 + C2, A1 + A3]
EDGES = [0.2, 0.5]


@pytest.fixture
def mixed():
    tree = {"E\n": [(E_CHAIN, -0.1)], "M\n": [(M1, -0.1), (M2, -0.2), (M3, -0.3)], **scripted_tree("Q1\n")}
    policy = ScriptedPolicy(tree, num_parameters=100)
    queries = [Query(p, {"question": p.strip(), "ground_truth": t}) for p, t in (("E\n", "4"), ("M\n", "3"),
                                                                                 ("Q1\n", "7"))]  # fmt: skip
    return policy, ScriptedScorer(PRM), queries


def plans(hard: BinPlan | None = None) -> list[BinPlan]:
    beam = BinPlan("beam", {"beam_width": 2, "expand_k": 3, "temperature": 1.0})
    return [BinPlan("probe"), BinPlan("greedy"), hard or beam]


def node_tokens(result) -> int:
    graphs = [result.graph] + ([result.graph.root.inner] if result.graph.root.inner else [])
    return sum(len(n.token_ids) for g in graphs for n in g.nodes)


def test_difficulty_rules_and_bins_by_hand():
    assert agreement(["3", "3", None, "4"]) == 0.5 and agreement([None, None]) == 0.0
    assert difficulty(["3", "3", None, "4"], [], "agreement") == 0.5
    assert difficulty(["3"] * 4, [1.0, 0.0, None, 0.5], "score") == pytest.approx(0.5)
    assert difficulty(["3", "4"], [2.0, 1.0], "mean") == pytest.approx((0.5 + 0.0) / 2)  # scores clamp to 1
    assert difficulty(["3"], [None], "score") == 1.0  # nothing scored: hardest
    assert [bin_of(d, [0.3, 0.6]) for d in (0.0, 0.29, 0.3, 0.6, 1.0)] == [0, 0, 1, 2, 2]


def test_budget_left_after_the_probe_by_hand():
    spent = Cost(prompt_tokens=5, generated_tokens=40, policy_calls=1, flops=90.0)
    left = remaining(Budget(max_generated_tokens=100, max_total_tokens=42, max_policy_calls=3), spent)
    assert (left.max_generated_tokens, left.max_total_tokens, left.max_policy_calls) == (60, 0, 2)
    assert left.max_scorer_calls is None and left.max_flops is None
    both = tighter(Budget(max_generated_tokens=60), Budget(max_generated_tokens=80, max_scorer_calls=2))
    assert (both.max_generated_tokens, both.max_scorer_calls, both.max_policy_calls) == (60, 2, None)


def test_each_bin_gets_its_plan_and_costs_add_up(mixed):
    policy, prm, queries = mixed
    cfg = ComputeOptimalConfig(probe_n=4, temperature=1.0, edges=EDGES, bins=plans())
    results = run_search("compute_optimal", policy, queries, prm, cfg)
    assert [r.outcome["bin"] for r in results] == [0, 1, 2]
    assert [r.outcome["difficulty"] for r in results] == [0.0, 0.25, 0.75]
    assert [r.answer for r in results] == ["4", "3", "7"] and results[2].text == BEST
    assert [r.outcome.get("search") for r in results] == [None, "greedy", "beam"]
    # one probe call for all three prompts; greedy for M; beam rounds for Q1 (root, b1 + a1, b2)
    assert [(n, p.n) for n, p in policy.calls] == [(3, 4), (1, 1), (1, 3), (2, 3), (1, 3)]
    assert len(prm.calls) == 3  # the probe is not scored under agreement + majority
    e, m, h = (r.cost for r in results)
    assert (e.generated_tokens, e.prompt_tokens, e.policy_calls) == (4 * len(E_CHAIN), 2, 1)
    assert (m.generated_tokens, m.prompt_tokens, m.policy_calls) == (3 * len(M1) + len(M3) + len(M1), 4, 2)
    probe_h = sum(map(len, H_PROBE))
    assert results[2].outcome["probe_cost"]["generated_tokens"] == probe_h
    assert h.generated_tokens > probe_h and h.policy_calls == 1 + 3 and h.scorer_calls == 3
    for r in results:
        assert r.cost.generated_tokens == node_tokens(r)
        assert r.cost.flops == 2 * 100 * r.cost.total_tokens
    assert results[2].graph.trace[0].op == "probe" and results[2].graph.root.inner.kind == "tree"
    assert total_probe_cost(results).generated_tokens == 4 * len(E_CHAIN) + 3 * len(M1) + len(M3) + probe_h


def test_hard_budget_includes_the_probe(mixed):
    policy, prm, queries = mixed
    probe_h = sum(map(len, H_PROBE))
    bins = plans(BinPlan("best_of_n", {"n": 3, "select": "verifier"}))
    from posttrain.search.scorers import VerifierScorer

    verifier = VerifierScorer(lambda text, meta: extract_answer(text) == meta["ground_truth"])
    # 40 tokens left after the probe: 3 samples x 13 tokens is under the minimum, so no search
    tight = ComputeOptimalConfig(probe_n=4, temperature=1.0, edges=EDGES, bins=bins,
                                 budget=Budget(max_generated_tokens=probe_h + 40))  # fmt: skip
    [r] = run_search("compute_optimal", policy, queries[2:], verifier, tight)
    assert r.cost.generated_tokens == probe_h and r.outcome["fallback"] == "probe"
    assert r.answer == "5"  # the probe's majority: a four-way tie goes to the first answer
    loose = ComputeOptimalConfig(probe_n=4, temperature=1.0, edges=EDGES, bins=bins,
                                 budget=Budget(max_generated_tokens=probe_h + 80))  # fmt: skip
    [r] = run_search("compute_optimal", policy, queries[2:], verifier, loose)
    assert probe_h < r.cost.generated_tokens <= probe_h + 80 and r.answer == "5"  # 26 tokens per chain: cut
    free = ComputeOptimalConfig(probe_n=4, temperature=1.0, edges=EDGES, bins=bins)
    [r] = run_search("compute_optimal", policy, queries[2:], verifier, free)
    assert r.answer == "7" and r.cost.generated_tokens == probe_h + len(A1 + A2) + len(BEST) + len(C1 + C2)


def test_scored_difficulty_and_probe_select(mixed):
    policy, _, queries = mixed
    from posttrain.search.scorers import VerifierScorer

    verifier = VerifierScorer(lambda text, meta: extract_answer(text) == meta["ground_truth"])
    # true-verifier difficulty = 1 - pass rate: E 0, M .25 (the 9 is wrong), Q1 .75 (one 7 of four)
    cfg = ComputeOptimalConfig(probe_n=4, temperature=1.0, difficulty="score", probe_select="score",
                               edges=[0.8], bins=[BinPlan("probe"), BinPlan("greedy")])  # fmt: skip
    results = run_search("compute_optimal", policy, queries, verifier, cfg)
    assert [r.outcome["difficulty"] for r in results] == [0.0, 0.25, 0.75]
    assert [r.answer for r in results] == ["4", "3", "7"]  # the verified probe chain wins
    assert all(r.cost.scorer_calls == 1 and r.cost.policy_calls == 1 for r in results)


def test_config_errors_name_the_bin(mixed):
    policy, prm, queries = mixed
    with pytest.raises(ConfigError, match="needs a scorer"):
        run_search("compute_optimal", policy, queries)  # the default hard bin votes by scores
    with pytest.raises(ConfigError) as err:
        ComputeOptimalConfig(bins=[BinPlan("probe"), BinPlan("greedy"), BinPlan("mtcs")])
    assert err.value.where == "bins[2].strategy" and "did you mean 'mcts'" in err.value.fix
    with pytest.raises(ConfigError) as err:
        run_search("compute_optimal", policy, queries, prm, {"bins": [{"strategy": "probe"}, {"strategy": "beam"},
                   {"strategy": "mcts", "config": {"n_simulation": 2}}]})  # fmt: skip
    assert err.value.where == "bins[2].config" and "n_simulation" in err.value.message
    seeded = ComputeOptimalConfig(seed=5, bins=plans())
    assert plan_config(seeded.bins[2], seeded, index=2).seed == 8  # bins never redraw the probe's samples
    assert plan_config(seeded.bins[2], seeded).step == seeded.step
    with pytest.raises(ConfigError, match="2 edges make 3 bins"):
        ComputeOptimalConfig(bins=[BinPlan("probe")])
    assert run_search("compute_optimal", policy, queries, None, {"bins": [{"strategy": "probe"}] * 3})


def test_choose_plans_by_hand():
    table = [[(0.9, 10.0), (0.9, 30.0), (1.0, 100.0)], [(0.2, 10.0), (0.5, 40.0), (0.6, 200.0)]]
    assert choose_plans(table, 50) == [0, 1]  # tie at .9 goes to the cheaper plan
    assert choose_plans(table, None) == [2, 2]
    assert choose_plans(table, 5) == [0, 0]  # nothing fits: the cheapest


def test_calibrate_picks_per_bin(mixed):
    policy, prm, queries = mixed
    cfg = ComputeOptimalConfig(probe_n=4, temperature=1.0, edges=EDGES, bins=plans())
    beam = plans()[2]

    def grade(r):
        return r.answer == r.graph.meta["ground_truth"]

    fitted, table = calibrate(policy, queries, cfg, [BinPlan("probe"), beam], grade, prm, max_tokens=1000)
    assert [p.n for _, p in policy.calls].count(4) == 1  # one probe shared by every candidate
    # E and M: both right, the probe is cheaper; Q1: only beam search finds 7
    assert [p.strategy for p in fitted.bins] == ["probe", "probe", "beam"]
    assert [[acc for acc, _ in row] for row in table] == [[1.0, 1.0], [1.0, 1.0], [0.0, 1.0]]
    assert table[0][0][1] == 4 * len(E_CHAIN) and all(row[1][1] > row[0][1] for row in table)
    cheap, _ = calibrate(policy, queries, cfg, [BinPlan("probe"), beam], grade, prm, max_tokens=1)
    assert [p.strategy for p in cheap.bins] == ["probe"] * 3


def test_tiny_model_compute_optimal(tiny_engine):
    from posttrain.data.tasks import make_split
    from posttrain.search import queries_from_problems
    from posttrain.search.scorers import task_verifier

    queries = queries_from_problems(make_split("arith", "test", 2, levels=[1, 2]))
    step = {"max_step_tokens": 6, "max_new_tokens": 16, "max_depth": 3}
    cfg = {"probe_n": 3, "temperature": 1.0, "step": step, "edges": [0.5], "budget": {"max_generated_tokens": 80},
           "bins": [{"strategy": "probe"}, {"strategy": "best_of_n", "config": {"n": 2, "select": "verifier"}}]}  # fmt: skip
    results = run_search("compute_optimal", tiny_engine, queries, task_verifier(), cfg)
    assert len(results) == 4
    for r in results:
        assert r.outcome["bin"] == (0 if r.outcome["difficulty"] < 0.5 else 1)
        assert r.cost.generated_tokens == node_tokens(r) <= 80
        assert r.cost.policy_calls == (1 if r.outcome["bin"] == 0 else 2)
        assert r.outcome["probe_cost"]["generated_tokens"] <= 3 * 16
