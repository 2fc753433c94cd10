"""Self-Refine (Madaan et al. 2023): generate, critique, revise, until a stop rule fires.

The structure is a chain: each revision is a (standalone) child of the attempt it revises.
Round 0 writes one chain per prompt (ONE policy call). Each round, for every prompt not
yet stopped: a critique -- by the policy from ``critique_prompt`` (ONE call), or written
from the scorer's step scores (`posttrain.search.got.score_critique`) -- then a revision
(ONE call), then scoring (ONE scorer call, when a scorer is given).

Stop rules, checked per prompt: the score reaches ``stop_score``; the critique contains
``stop_phrase``; ``max_rounds`` revisions; the budget is spent. The answer is the
best-scored attempt (the latest one without a scorer): the seed article warns that
prompted self-critique without external feedback is unreliable, so a scorer keeps a
worse revision from replacing a better attempt.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

from posttrain.search.base import SearchConfig, choose, finish, live, make_graphs, need_scorer
from posttrain.search.got import question_of, refine_prompt, score_critique
from posttrain.search.operators import Aggregation, critique, evaluate, expand, refine
from posttrain.search.protocols import PolicyLike, Query, Scorer
from posttrain.search.registry import register_strategy
from posttrain.search.structures import Node, SearchGraph


@dataclass
class SelfRefineConfig(SearchConfig):
    """Self-Refine: generate, critique, revise."""

    max_rounds: int = 3
    """Revisions at most."""
    critic: Literal["scorer", "policy"] = "scorer"
    """Who writes the critique: from the scorer's step scores, or the policy itself."""
    stop_score: float = 1.0
    """Stop once an attempt scores at least this (needs a scorer)."""
    stop_phrase: str = "no issues"
    """Stop when the critique contains this (case-insensitive)."""
    how: Aggregation = "min"
    """How an attempt's step scores become its score."""
    critique_max_tokens: int = 64
    """Token cap of a policy-written critique."""

    def uses_scorer(self) -> bool:
        return self.critic == "scorer"


def critique_prompt(g: SearchGraph, node: Node) -> str:
    """Default self-critique prompt."""
    return f"{question_of(g)}\nAttempt: {g.path_text(node).strip()}\nList any mistakes, or say 'no issues':\n"


def _critiques(
    policy, scorer, targets: list[tuple[SearchGraph, Node]], cfg: SelfRefineConfig
) -> list[str | None]:
    if cfg.critic == "policy":
        params = cfg.sampling(0.0).replace(max_new_tokens=cfg.critique_max_tokens)
        return critique(policy, targets, critique_prompt, params, cfg.budget)
    out = []
    for g, n in targets:
        text = score_critique(g, n, cfg.step.step_sep)
        n.meta["critique"] = text
        g.record("critique", [n.id], [], critique=text, source="scorer")
        out.append(text)
    return out


@register_strategy("self_refine", SelfRefineConfig)
def self_refine(
    policy: PolicyLike, queries: Sequence[Query | str], cfg: SelfRefineConfig, scorer: Scorer | None
):
    """Self-Refine (see the module docstring); ``critic="scorer"`` needs a scorer."""
    if cfg.critic == "scorer" and scorer is None:
        need_scorer(scorer, "self_refine", "critic='scorer'; or set critic='policy'")
    graphs = make_graphs(queries, kind="chain")
    first = expand(policy, [(g, g.root) for g in graphs], 1, cfg.sampling(), cfg.step, cfg.budget, "chain")
    current = {id(g): ns[0] for g, ns in zip(graphs, first, strict=True) if ns}
    if scorer is not None:
        evaluate(
            scorer,
            [(g, current[id(g)]) for g in graphs if id(g) in current],
            cfg.how,
            cfg.step.step_sep,
            cfg.budget,
        )
    for _ in range(cfg.max_rounds):
        active = [g for g in live(graphs, cfg, policy) if id(g) in current]
        active = [g for g in active if (current[id(g)].score or 0.0) < cfg.stop_score or scorer is None]
        crits = _critiques(policy, scorer, [(g, current[id(g)]) for g in active], cfg)
        go = [
            (g, c)
            for g, c in zip(active, crits, strict=True)
            if c and cfg.stop_phrase.lower() not in c.lower()
        ]
        for g in active:
            g.round += 1
            if all(g is not h for h, _ in go):
                current.pop(id(g))  # stopped: critique found no issue (or was refused)
        if not go:
            break
        new = refine(policy, [(g, current[id(g)]) for g, _ in go], [c for _, c in go], refine_prompt,
                     cfg.sampling(), cfg.step, cfg.budget)  # fmt: skip
        made = [(g, ns[0]) for (g, _), ns in zip(go, new, strict=True) if ns]
        if scorer is not None and made:
            evaluate(scorer, made, cfg.how, cfg.step.step_sep, cfg.budget)
        for g, n in made:
            current[id(g)] = n
    out = []
    for g in graphs:
        attempts = [n for n in g.nodes[1:]]
        node = choose(g, attempts, "score")[0] if scorer is not None else (attempts[-1] if attempts else None)
        out.append(finish("self_refine", g, node, cfg, revisions=max(0, len(attempts) - 1)))
    return out
