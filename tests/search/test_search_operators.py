"""Operators on hand-built structures and the scripted environment; selection scores by hand."""

from __future__ import annotations

import math

import pytest
from search_env import A1, A2, B1, B2, B3, BEST, C1

from posttrain.errors import ConfigError, DataError
from posttrain.rollout.sampling import SamplingParams
from posttrain.search.budget import Budget, Cost
from posttrain.search.operators import (
    GenRequest,
    aggregate,
    critique,
    evaluate,
    evaluate_likelihood,
    expand,
    refine,
    run_requests,
)
from posttrain.search.operators_tree import (
    backpropagate,
    backtrack,
    prune,
    puct,
    restructure,
    select_child,
    select_leaf,
    uct,
    vote,
)
from posttrain.search.scripted import ScriptedPolicy
from posttrain.search.structures import Node, SearchGraph, StepConfig, chain_from_steps, path_steps

T = SamplingParams(temperature=1.0)
STEP = StepConfig(step_sep="<step>")


def graph(prompt="Q1\n", kind="tree") -> SearchGraph:
    return SearchGraph(prompt=prompt, kind=kind, meta={"question": "Q1", "ground_truth": "7"}, cost=Cost())


def test_uct_and_puct_by_hand():
    assert uct(0.5, 10, 2, 1.414) == pytest.approx(0.5 + 1.414 * math.sqrt(math.log(10) / 2))
    assert uct(0.5, 10, 2, 1.414) == pytest.approx(2.01723, abs=1e-4)
    assert uct(0.0, 10, 0, 1.0) == math.inf
    assert puct(0.5, 0.25, 16, 3, 2.0) == pytest.approx(1.0)  # 0.5 + 2 * 0.25 * 4 / 4
    assert puct(0.0, 0.5, 0, 0, 1.0) == 0.0


def _hand_tree() -> tuple[SearchGraph, Node, Node, Node]:
    g = graph()
    g.root.visits = 10
    a = g.add(g.root, text="A", visits=6, value=0.6, prior=0.2)
    b = g.add(g.root, text="B", visits=3, value=0.4, prior=0.5)
    c = g.add(g.root, text="C", visits=1, value=0.2, prior=0.05)
    return g, a, b, c


def test_select_child_uct_vs_puct():
    g, a, b, c = _hand_tree()
    # UCT, c=1: A .6+sqrt(ln10/6)=1.2195  B .4+sqrt(ln10/3)=1.2761  C .2+sqrt(ln10/1)=1.7174
    assert select_child(g, g.root, "uct", 1.0) is c
    # PUCT, c=1: A .6+.2*sqrt(10)/7=.6904  B .4+.5*sqrt(10)/4=.7953  C .2+.05*sqrt(10)/2=.2791
    assert select_child(g, g.root, "puct", 1.0) is b
    b.pruned = True
    assert select_child(g, g.root, "puct", 1.0) is a
    with pytest.raises(ConfigError, match="uct"):
        select_child(g, g.root, "ucb", 1.0)  # type: ignore[arg-type]


def test_select_leaf_descends_and_records_path():
    g, a, b, c = _hand_tree()
    d = g.add(b, text="D", visits=1, value=0.1)
    leaf = select_leaf(g, "puct", 1.0)
    assert leaf is d
    assert g.trace[-1].op == "select" and g.trace[-1].info["path"] == [0, b.id, d.id]


def test_backpropagate_mean_max_discounted():
    g = graph()
    a = g.add(g.root, text="a")
    b = g.add(a, text="b")
    assert backpropagate(g, b, 1.0) == [b.id, a.id, 0]
    backpropagate(g, b, 0.0)
    assert (b.visits, b.value, g.root.value) == (2, 0.5, 0.5)
    g2 = graph()
    a2 = g2.add(g2.root, text="a")
    b2 = g2.add(a2, text="b")
    backpropagate(g2, b2, 1.0, "discounted", gamma=0.5)
    assert (b2.value, a2.value, g2.root.value) == (1.0, 0.5, 0.25)
    backpropagate(g2, b2, 0.2, "max")
    backpropagate(g2, a2, 0.9, "max")
    assert b2.value == 1.0 and a2.value == 0.9 and a2.visits == 3


def test_prune_dedup_threshold_depth_topk():
    g = graph()
    xs = [
        g.add(g.root, text=t, score=s)
        for t, s in [("x", 0.9), ("x ", 0.8), ("y", 0.1), ("z", 0.5), ("w", None)]
    ]
    kept = prune(g, xs, dedup=True, min_score=0.3)
    assert [n.text for n in kept] == ["x", "z"]
    assert [n.pruned for n in xs] == [False, True, True, False, True]
    deep = g.add(xs[0], text="d", score=1.0)
    assert prune(g, [deep, xs[3]], max_depth=1) == [xs[3]]
    more = [g.add(g.root, text=str(i), score=i / 10) for i in range(5)]
    assert [n.text for n in prune(g, more, keep_top=2)] == ["3", "4"]
    assert g.trace[-1].op == "prune" and len(g.trace[-1].info["pruned"]) == 3


def test_backtrack_goes_to_nearest_ancestor_with_open_child():
    g = graph()
    a = g.add(g.root, text="a", score=0.9)
    b = g.add(g.root, text="b", score=0.6)
    c = g.add(g.root, text="c", score=0.2)
    assert backtrack(g, g.root, threshold=0.5) is a
    a1 = g.add(a, text="a1", score=0.1, terminal=True)
    assert backtrack(g, a, threshold=0.5) is b  # a's only child is finished: back to the root
    assert g.trace[-1].info == {"to_ancestor": 0, "jumped": 1}
    b.pruned = True
    assert backtrack(g, a1, threshold=0.5) is None  # c is below the threshold
    assert backtrack(g, a1, threshold=None) is c


def test_vote_majority_and_weighted():
    assert vote(["4", "3", "4", None]) == ("4", {"4": 2.0, "3": 1.0})
    assert vote(["4", "3", "4"], [0.1, 0.9, 0.2])[0] == "3"
    assert vote(["5", "6"])[0] == "5"  # ties: first seen
    assert vote([None, None]) == (None, {})


def test_restructure_flattens_best_branches_into_insights():
    g = graph()
    a = g.add(g.root, text="s1<step>")
    leaf1 = g.add(a, text="s2<step>s3")
    leaf2 = g.add(a, text="s4")
    chain = restructure(g, [leaf1, leaf2], step_sep="<step>")
    assert chain.kind == "chain"
    assert [n.text for n in chain.nodes[1:]] == ["s1<step>", "s2<step>", "s3<step>", "s4"]
    assert chain.nodes[-1].terminal and chain.path_text(chain.nodes[-1]) == "s1<step>s2<step>s3<step>s4"
    assert chain.nodes[1].meta["source"] == a.id and g.trace[-1].op == "restructure"


def test_structures_chain_graph_nested_roundtrip():
    chain = chain_from_steps("P", ["x", "y"], step_sep="<step>", question="q")
    assert chain.path_text(chain.nodes[-1]) == "x<step>y" and chain.nodes[-1].terminal
    with pytest.raises(DataError, match="at most one child"):
        chain.add(chain.nodes[1], text="z")
    tree = graph()
    a, b = tree.add(tree.root, text="a"), tree.add(tree.root, text="b")
    with pytest.raises(DataError, match="kind='graph'"):
        tree.add([a, b], text="ab")
    g = graph(kind="graph")
    a, b = g.add(g.root, text="a"), g.add(g.root, text="b")
    merged = g.add([a, b], text="ab", standalone=True, inner=chain)
    assert merged.parents == [a.id, b.id] and a.children == [merged.id] and g.path(merged) == [merged]
    back = SearchGraph.from_dict(g.to_dict())
    assert back.to_dict() == g.to_dict()
    assert back.nodes[merged.id].inner.path_text(back.nodes[merged.id].inner.nodes[-1]) == "x<step>y"


def test_expand_batches_all_targets_in_one_call_and_charges_cost(env):
    policy, _, _, queries = env
    gs = [graph(q.prompt) for q in queries]
    kids = expand(policy, [(g, g.root) for g in gs], 3, T, STEP)
    assert len(policy.calls) == 1 and policy.calls[0][0] == 3 and policy.calls[0][1].n == 3
    assert policy.calls[0][1].stop == ["<step>"] and policy.calls[0][1].max_new_tokens == STEP.max_step_tokens
    assert [n.text for n in kids[0]] == [A1, B1, C1]
    assert not any(n.terminal for n in kids[0])
    assert sum(n.prior for n in kids[0]) == pytest.approx(1.0)
    assert kids[0][0].prior > kids[0][1].prior > kids[0][2].prior  # from the logprobs
    g = gs[0]
    assert g.prompt_ids == [ord(ch) for ch in "Q1\n"]
    # prompt counted once (prefix sharing), generated = sum of the three steps
    assert g.cost.prompt_tokens == 3 and g.cost.generated_tokens == len(A1 + B1 + C1)
    assert g.cost.policy_calls == 1 and g.cost.flops == 2 * 1000 * (3 + len(A1 + B1 + C1))
    assert g.trace[0].op == "expand" and g.trace[0].outputs == [1, 2, 3]
    # the next round continues from token ids, unequal n goes out as repeated prompts
    reqs = [GenRequest(g, [kids[0][1]], n=2), GenRequest(gs[1], [kids[1][0]], n=1)]
    grown = run_requests(policy, reqs, T, STEP)
    assert isinstance(policy.calls[-1], tuple) and policy.calls[-1][0] == 3 and policy.calls[-1][1].n == 1
    assert [n.text for n in grown[0]] == [B2, "b9</think>\nAnswer: 6"] and grown[0][1].terminal
    assert g.path_text(grown[0][0]) == B1 + B2


def test_expand_granularities_and_depth_limit(env):
    policy, *_ = env
    g = graph()
    [chain] = expand(policy, [(g, g.root)], 1, SamplingParams(temperature=0.0), STEP, mode="chain")
    assert chain[0].text == A1 + A2 and chain[0].terminal  # greedy follows the likeliest pieces
    g = graph()
    [tok] = expand(policy, [(g, g.root)], 1, T, StepConfig(granularity="token", tokens_per_step=4))
    assert tok[0].text == "<thi" and tok[0].finish_reason == "length" and not tok[0].terminal
    g = graph()
    [kids] = expand(policy, [(g, g.root)], 1, T, StepConfig(max_depth=1))
    assert kids[0].terminal and kids[0].meta["depth_limit"]


def test_budget_is_enforced_inside_expand(env):
    policy, *_ = env
    g = graph()
    budget = Budget(max_generated_tokens=40)
    expand(policy, [(g, g.root)], 2, T, STEP, budget)  # 2 x 15 tokens
    assert g.cost.generated_tokens == 30
    [kids] = expand(policy, [(g, g.nodes[1])], 2, T, STEP, budget)  # 10 left: below the minimum, refused
    assert kids == [] and g.cost.generated_tokens == 30 and g.trace[-1].info["refused"]
    g2, step32, budget30 = graph(), StepConfig(max_step_tokens=32), Budget(max_generated_tokens=30)
    expand(policy, [(g2, g2.root)], 1, T, step32, budget30)  # A1: 15 tokens
    [k] = expand(policy, [(g2, g2.nodes[1])], 1, T, step32, budget30)  # 15 left: A2 (20) is cut
    assert g2.cost.generated_tokens == 30 and k[0].text == A2[:15]
    assert k[0].terminal and k[0].meta["truncated"] and k[0].finish_reason == "length"
    g3 = graph()
    expand(policy, [(g3, g3.root)], 1, T, STEP, Budget(max_policy_calls=1))
    assert expand(policy, [(g3, g3.nodes[1])], 1, T, STEP, Budget(max_policy_calls=1)) == [[]]


def test_evaluate_prm_aggregations_in_one_call(env):
    policy, prm, verifier, _ = env
    g = graph()
    a = g.add(g.root, text=B1)
    b = g.add(a, text=B2)
    c = g.add(b, text=B3, terminal=True)
    vals = evaluate(prm, [(g, a), (g, c)], "min", "<step>")
    assert prm.calls == [2] and vals == [0.8, 0.8] and c.step_scores == [0.8, 0.9, 1.0]
    assert evaluate(prm, [(g, c)], "last")[0] == 1.0
    assert evaluate(prm, [(g, c)], "prod")[0] == pytest.approx(0.72)
    assert evaluate(prm, [(g, c)], "mean")[0] == pytest.approx(0.9)
    assert path_steps(g, c, "<step>") == ["<think>b1", "b2", B3]
    assert evaluate(verifier, [(g, c), (g, b)], into="reward") == [1.0, 0.0]
    assert c.reward == 1.0 and g.cost.scorer_calls == 5 and g.cost.scored_items == 7
    assert evaluate(prm, [(g, c)], budget=Budget(max_scorer_calls=5)) == [None]


def test_evaluate_likelihood_and_refine_aggregate_critique():
    g = graph(kind="graph")
    a = g.add(g.root, text="ab", token_ids=[1, 2], logprob=-1.0)
    assert evaluate_likelihood([(g, a)]) == [pytest.approx(math.exp(-0.5))]
    policy = ScriptedPolicy(
        {}, rules={"Fix": [("fixed", 0.0)], "Merge": [("merged", 0.0)], "Judge": [("bad", 0.0)]}
    )
    b = g.add(g.root, text="cd")
    [[r]] = refine(policy, [(g, a)], ["too short"], lambda g_, n, c: f"Fix {n.text}: {c}", T, STEP)
    assert r.text == "fixed" and r.standalone and r.kind == "refined" and r.parents == [a.id] and r.terminal
    [[m]] = aggregate(policy, [(g, [a, b])], lambda g_, ns: "Merge " + " ".join(n.text for n in ns), T, STEP)
    assert m.text == "merged" and m.parents == [a.id, b.id] and g.path_text(m) == "merged"
    assert critique(policy, [(g, m)], lambda g_, n: "Judge " + n.text, T) == ["bad"]
    assert m.meta["critique"] == "bad" and len(policy.calls) == 3
    assert [e.op for e in g.trace] == ["evaluate", "refine", "aggregate", "critique"]


def test_expand_rejects_bad_k(env):
    with pytest.raises(ConfigError):
        expand(env[0], [], 0, T, STEP)
    assert BEST.startswith(B1) and C1 != A1
