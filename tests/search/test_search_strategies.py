"""Every strategy on the scripted environment: it finds the known best path within a budget,
makes one policy call per round for all prompts, and counts what it spends."""

from __future__ import annotations

import pytest
from search_env import A1, A2, BEST, PROMPTS

from posttrain.errors import ConfigError
from posttrain.search import Budget, get_strategy, run_search, strategy_names
from posttrain.search.beam import BeamConfig, DVTSConfig
from posttrain.search.got import GoTConfig
from posttrain.search.mcts import MCTSConfig
from posttrain.search.protocols import Query
from posttrain.search.scripted import ScriptedPolicy, ScriptedScorer
from posttrain.search.self_refine import SelfRefineConfig
from posttrain.search.tot import ToTConfig


def answers(results) -> list[str | None]:
    return [r.answer for r in results]


def test_registry_lists_and_rejects():
    assert strategy_names() == [
        "beam", "best_of_n", "compute_optimal", "dvts", "got", "greedy", "mcts", "self_consistency", "self_refine",
        "tot",
    ]  # fmt: skip
    with pytest.raises(ConfigError, match="did you mean 'mcts'"):
        get_strategy("mtcs")
    with pytest.raises(ConfigError, match="needs a scorer"):
        run_search("beam", ScriptedPolicy({}), ["x"])
    with pytest.raises(ConfigError, match="search.n_simulation"):
        run_search("mcts", ScriptedPolicy({}), ["x"], ScriptedScorer({}), {"n_simulation": 3})


def test_greedy_follows_the_likeliest_path_and_counts_flops(env):
    policy, _, _, queries = env
    results = run_search("greedy", policy, queries)
    assert answers(results) == ["5", "5", "5"] and results[0].text == A1 + A2
    assert len(policy.calls) == 1 and policy.calls[0][1].greedy
    cost = results[0].cost
    assert (cost.prompt_tokens, cost.generated_tokens) == (3, len(A1 + A2))
    assert cost.flops == 2 * 1000 * (3 + len(A1 + A2))


@pytest.mark.parametrize(
    "select, want",
    [("verifier", "7"), ("prm_min", "7"), ("prm_last", "7"), ("weighted_majority", "7"), ("majority", "5")],
)
def test_best_of_n(env, select, want):
    policy, prm, verifier, queries = env
    scorer = verifier if select == "verifier" else prm
    results = run_search("best_of_n", policy, queries, scorer, {"n": 4, "select": select})
    assert answers(results) == [want] * 3
    assert len(policy.calls) == 1 and policy.calls[0][0] == 3 and policy.calls[0][1].n == 4
    assert len(scorer.calls if hasattr(scorer, "calls") else [1]) == (0 if select == "majority" else 1)
    if select != "majority":
        assert results[0].text == BEST


def test_self_consistency_majority_vote():
    tree = {
        "S\n": [
            ("x</think>\nAnswer: 3", -0.1),
            ("y</think>\nAnswer: 4", -0.5),
            ("z</think>\nAnswer: 4", -2.0),
        ]
    }
    policy = ScriptedPolicy(tree)
    assert run_search("greedy", policy, ["S\n"])[0].answer == "3"
    [res] = run_search("self_consistency", policy, ["S\n"], config={"n": 3})
    assert res.answer == "4" and res.outcome["votes"] == {"3": 1.0, "4": 2.0}
    assert res.graph.trace[-2].op == "aggregate"


def test_beam_finds_best_path_one_call_per_round(env):
    policy, prm, _, queries = env
    results = run_search("beam", policy, queries, prm, BeamConfig(beam_width=2, expand_k=3, temperature=1.0))
    assert answers(results) == ["7"] * 3 and all(r.text == BEST for r in results)
    # rounds: root -> {a1, b1}; -> {b2} (+ finished a2, a3, b9); -> b3
    assert len(policy.calls) == 3 and len(prm.calls) == 3
    assert [c[0] for c in policy.calls] == [3, 6, 3]  # every prompt's beam in one call
    assert results[0].cost.policy_calls == 3 and results[0].cost.scorer_calls == 3


def test_beam_lookahead_ranks_by_rolled_out_tip(env):
    policy, _, _, queries = env
    prm = ScriptedScorer({"<think>a1": 0.9, "<think>b1": 0.5, "b2": 0.6, "a2</think>\nAnswer: 5": 0.0,
                          "b9</think>\nAnswer: 6": 0.7, "b3</think>\nAnswer: 7": 1.0})  # fmt: skip
    plain = run_search("beam", policy, queries[:1], prm, BeamConfig(beam_width=1, expand_k=3))
    assert plain[0].answer == "5"  # myopic: a1 looks best
    policy.calls.clear()
    ahead = run_search("beam", policy, queries[:1], prm, BeamConfig(beam_width=1, expand_k=3, lookahead=2))
    assert ahead[0].answer == "7"
    assert any(n.kind == "lookahead" for n in ahead[0].graph.nodes)


def test_dvts_subtrees(env):
    policy, prm, _, queries = env
    results = run_search("dvts", policy, queries, prm, DVTSConfig(n_subtrees=2, expand_k=3))
    assert answers(results) == ["7"] * 3
    assert {n.meta.get("subtree") for n in results[0].graph.nodes[1:]} == {0, 1}
    assert len(policy.calls) == 3 and policy.calls[0][0] == 6


@pytest.mark.parametrize("value", ["scorer", "rollout", "mix"])
def test_mcts_finds_best_path(env, value):
    policy, prm, verifier, queries = env
    scorer = prm if value == "scorer" else ScriptedScorer({**prm.values})
    cfg = MCTSConfig(n_simulations=6, expand_k=3, value=value, temperature=1.0)
    results = run_search("mcts", policy, queries, scorer, cfg)
    assert answers(results) == ["7"] * 3
    rounds = [e for e in results[0].graph.trace if e.op == "expand"]
    calls_per_round = 1 if value == "scorer" else 2  # rollouts are one more call
    assert len(policy.calls) <= calls_per_round * cfg.n_simulations and len(rounds) <= cfg.n_simulations
    assert policy.calls[0][0] == 3  # the three roots expanded together
    root = results[0].graph.root
    assert root.visits >= 3 and 0 <= root.value <= 1
    if value != "scorer":
        assert any(n.kind == "rollout" for n in results[0].graph.nodes)


def test_mcts_respects_hard_budget(env):
    policy, prm, _, queries = env
    cfg = MCTSConfig(n_simulations=50, expand_k=3, budget=Budget(max_generated_tokens=60))
    results = run_search("mcts", policy, queries, prm, cfg)
    for r in results:
        assert r.cost.generated_tokens <= 60
    cfg = MCTSConfig(n_simulations=50, expand_k=2, budget=Budget(max_policy_calls=2))
    for r in run_search("mcts", policy, queries, prm, cfg):
        assert r.cost.policy_calls == 2


def test_tot_bfs_and_dfs_with_backtracking(env):
    policy, prm, _, queries = env
    bfs = run_search("tot", policy, queries, prm, ToTConfig(mode="bfs", breadth=2, threshold=0.3))
    assert answers(bfs) == ["7"] * 3
    misleading = ScriptedScorer({**prm.values, "<think>a1": 0.9})  # a1 looks best but dead-ends
    dfs = run_search("tot", policy, queries, misleading, ToTConfig(mode="dfs", threshold=0.3, accept=0.9))
    assert answers(dfs) == ["7"] * 3
    jumps = [e for e in dfs[0].graph.trace if e.op == "backtrack" and e.info.get("jumped", 0) > 0]
    assert jumps, "DFS should have backtracked from the a1 subtree"


def test_got_aggregates_and_refines():
    tree = {
        "G\n": [("<think>p<step>q</think>\nAnswer: 1", -0.1), ("<think>r<step>s</think>\nAnswer: 2", -0.2)]
    }
    rules = {"Combine": [("<think>p<step>s</think>\nAnswer: 3", 0.0)], "Revised": [("<think>r<step>t", 0.0)]}
    policy = ScriptedPolicy(tree, rules)
    prm = ScriptedScorer({"<think>p": 0.9, "q</think>\nAnswer: 1": 0.1, "<think>r": 0.2,
                          "s</think>\nAnswer: 2": 0.9, "s</think>\nAnswer: 3": 0.95, "t": 0.5})  # fmt: skip
    [res] = run_search("got", policy, [Query("G\n", {"question": "G"})], prm, GoTConfig(n_init=2, rounds=1))
    assert res.answer == "3" and len(res.graph.node(res.best).parents) == 2
    assert len(policy.calls) == 2 and len(prm.calls) == 2  # aggregate + refine fused in one call
    ops = [e.op for e in res.graph.trace]
    assert "aggregate" in ops and "refine" in ops


def test_self_refine_revises_until_stop_rule():
    tree = {"R\n": [("<think>u</think>\nAnswer: 1", 0.0)]}
    policy = ScriptedPolicy(tree, {"Revised": [("<think>v</think>\nAnswer: 2", 0.0)]})
    prm = ScriptedScorer({"<think>u</think>\nAnswer: 1": 0.2, "<think>v</think>\nAnswer: 2": 0.95})
    [res] = run_search("self_refine", policy, ["R\n"], prm, SelfRefineConfig(stop_score=0.9, max_rounds=3))
    assert res.answer == "2" and res.outcome["revisions"] == 1 and res.graph.kind == "chain"
    assert len(policy.calls) == 2 and "looks wrong" in res.graph.nodes[1].meta["critique"]
    quiet = ScriptedPolicy(tree, {"List any mistakes": [("no issues", 0.0)]})
    [res] = run_search("self_refine", quiet, ["R\n"], None, SelfRefineConfig(critic="policy"))
    assert res.answer == "1" and res.outcome["revisions"] == 0 and len(quiet.calls) == 2


def test_batching_many_prompts_single_call_per_round(env):
    policy, prm, _, _ = env
    many = [Query(p) for p in PROMPTS] * 4  # 12 searches
    run_search("beam", policy, many, prm, BeamConfig(beam_width=2, expand_k=3))
    assert [c[0] for c in policy.calls] == [12, 24, 12]


def test_mcts_visits_and_values_by_hand(env):
    policy, prm, _, queries = env
    [res] = run_search("mcts", policy, queries[:1], prm, MCTSConfig(n_simulations=3, expand_k=3, c=1.0))
    g = res.graph
    a1, b1, c1 = (g.node(i) for i in g.root.children)
    # sim 1 expands the root: a1 .4, b1 .8, c1 .1, one visit each.
    # sim 2, PUCT with priors ~(.350, .341, .309), N=3: a1 .703, b1 1.095, c1 .367 -> expand b1: b2 .9, b9 .2
    # sim 3, N=5: a1 .792, b1 .633 + .341 * sqrt(5) / 4 = .824 -> b1; then b2 (1.329) over b9 (.637) -> b3 1.0
    assert [e.info["path"] for e in g.trace if e.op == "select"] == [
        [0],
        [0, b1.id],
        [0, b1.id, b1.children[0]],
    ]
    assert (g.root.visits, a1.visits, b1.visits, c1.visits) == (6, 1, 4, 1)
    assert b1.value == pytest.approx((0.8 + 0.9 + 0.2 + 1.0) / 4)
    assert g.root.value == pytest.approx((0.4 + 0.8 + 0.1 + 0.9 + 0.2 + 1.0) / 6)
    assert a1.prior == pytest.approx(0.3503, abs=1e-3) and res.answer == "7"


def test_mcts_parallel_leaves_share_one_call(env):
    policy, prm, _, queries = env
    results = run_search("mcts", policy, queries, prm, MCTSConfig(n_simulations=2, expand_k=2, parallel=3))
    # sim 1: the root only (the second pick is the root again). sim 2, root children a1 .4, b1 .8:
    # PUCT picks b1 (1.149 vs .758); under b1's virtual loss a1 (.839 vs .685); then b1 again: stop
    assert [c[0] for c in policy.calls] == [3, 6]  # both leaves of all three trees in one call
    g = results[0].graph
    assert [e.info["path"][-1] for e in g.trace if e.op == "select"] == [0, 0, 2, 1, 2]
    assert g.root.visits == 2 + 4 and all(n.visits >= 1 for n in g.nodes[1:])
