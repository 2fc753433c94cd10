"""Graph-of-Thoughts (Besta et al. 2024): sample chains, then rounds of Aggregate + Refine.

Round 0 samples ``n_init`` whole chains per prompt (ONE policy call) and scores them (ONE
scorer call). Each later round, per prompt: the best ``aggregate_k`` nodes are merged by
the policy into one new node (a node with several parents), and the best node is revised
from a critique written from its weakest step score -- both requests go out in ONE policy
call -- and the new nodes are scored (ONE call). The answer is the best-scored node.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from posttrain.search.base import SearchConfig, choose, finish, live, make_graphs
from posttrain.search.operators import (
    Aggregation,
    aggregate_requests,
    evaluate,
    expand,
    refine_requests,
    run_requests,
)
from posttrain.search.operators_tree import select_top
from posttrain.search.protocols import PolicyLike, Query, Scorer
from posttrain.search.registry import register_strategy
from posttrain.search.structures import Node, SearchGraph, path_steps


@dataclass
class GoTConfig(SearchConfig):
    """Graph-of-Thoughts: aggregate and refine rounds over sampled chains."""

    n_init: int = 4
    """Chains sampled per prompt in round 0."""
    rounds: int = 2
    """Aggregate + refine rounds after round 0."""
    aggregate_k: int = 2
    """Best nodes merged per round (0 = no aggregation)."""
    refine: bool = True
    """Also revise the best node each round."""
    how: Aggregation = "min"
    """How a chain's step scores become its score."""

    def __post_init__(self) -> None:
        self.check_positive("n_init")


def question_of(g: SearchGraph) -> str:
    return str(g.meta.get("question") or g.prompt)


def aggregate_prompt(g: SearchGraph, nodes: list[Node]) -> str:
    """Default Aggregate prompt: the question, the candidate solutions, a request to merge them."""
    body = "\n".join(f"Solution {i + 1}: {g.path_text(n).strip()}" for i, n in enumerate(nodes))
    return f"{question_of(g)}\n{body}\nCombine the correct parts into one solution.\n"


def refine_prompt(g: SearchGraph, node: Node, critique: str) -> str:
    """Default Refine prompt: the question, the attempt, the critique, a request to revise."""
    return (
        f"{question_of(g)}\nAttempt: {g.path_text(node).strip()}\nFeedback: {critique}\nRevised solution:\n"
    )


def score_critique(g: SearchGraph, node: Node, step_sep: str) -> str:
    """A critique written from the scorer's step scores: the weakest step, or 'no issues'."""
    steps = path_steps(g, node, step_sep)
    scores = node.step_scores
    if not steps or not scores:
        return "Check every step."
    i = min(range(min(len(steps), len(scores))), key=scores.__getitem__)
    if scores[i] >= 0.5:
        return "no issues found"
    return f"Step {i + 1} ('{steps[i]}') looks wrong (score {scores[i]:.2f}); redo it and the steps after it."


@register_strategy("got", GoTConfig, needs_scorer=True)
def got(policy: PolicyLike, queries: Sequence[Query | str], cfg: GoTConfig, scorer: Scorer | None):
    """Graph-of-Thoughts (see the module docstring)."""
    graphs = make_graphs(queries, kind="graph")
    chains = expand(
        policy, [(g, g.root) for g in graphs], cfg.n_init, cfg.sampling(), cfg.step, cfg.budget, "chain"
    )
    evaluate(scorer, [(g, c) for g, cs in zip(graphs, chains, strict=True) for c in cs], cfg.how,
             cfg.step.step_sep, cfg.budget)  # fmt: skip
    for _ in range(cfg.rounds):
        requests = []
        for g in live(graphs, cfg, policy):
            g.round += 1
            pool = [n for n in g.nodes[1:] if not n.pruned and n.score is not None]
            if cfg.aggregate_k >= 2 and len(pool) >= 2:
                requests += aggregate_requests([(g, select_top(g, pool, cfg.aggregate_k))], aggregate_prompt)
            if cfg.refine and pool:
                best = select_top(g, pool, 1)[0]
                requests += refine_requests(
                    [(g, best)], [score_critique(g, best, cfg.step.step_sep)], refine_prompt
                )
        if not requests:
            break
        new = run_requests(policy, requests, cfg.sampling(), cfg.step, cfg.budget, "chain")
        made = [(r.graph, n) for r, ns in zip(requests, new, strict=True) for n in ns]
        if not made:
            break
        evaluate(scorer, made, cfg.how, cfg.step.step_sep, cfg.budget)
    out = []
    for g in graphs:
        node, _ = choose(g, [n for n in g.nodes[1:] if n.score is not None], "score")
        out.append(finish("got", g, node, cfg, nodes=len(g.nodes) - 1))
    return out
