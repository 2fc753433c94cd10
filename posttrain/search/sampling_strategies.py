"""Chain-level strategies: greedy CoT, best-of-N, self-consistency.

Each samples whole chains (one node per completion under the root) in one policy call
for all prompts, then chooses:

- ``greedy``: one chain at temperature 0.
- ``best_of_n``: N chains; ``select`` = ``verifier`` / ``orm`` / ``prm_last`` (the scorer's
  last-step score), ``prm_min`` / ``prm_prod`` / ``prm_mean`` (a PRM's step scores reduced),
  ``weighted_majority`` (answers weighted by the last-step score: sum_i s_i [a_i = a]),
  ``majority`` (no scorer), or ``likelihood`` (exp of the mean token log-prob, no scorer).
  One scorer call for all prompts. Ties go to the earlier sample.
- ``self_consistency``: N chains, majority vote over the extracted answers (Wang et al.).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

from posttrain.errors import ConfigError
from posttrain.search.base import SearchConfig, SearchResult, choose, finish, make_graphs, need_scorer
from posttrain.search.operators import evaluate, evaluate_likelihood, expand
from posttrain.search.protocols import PolicyLike, Query, Scorer
from posttrain.search.registry import register_strategy

Select = Literal[
    "verifier",
    "orm",
    "prm_last",
    "prm_min",
    "prm_prod",
    "prm_mean",
    "weighted_majority",
    "majority",
    "likelihood",
]
_HOW = {"verifier": "last", "orm": "last", "prm_last": "last", "weighted_majority": "last",
        "prm_min": "min", "prm_prod": "prod", "prm_mean": "mean"}  # fmt: skip


@dataclass
class GreedyConfig(SearchConfig):
    """Greedy chain of thought: one completion per prompt."""

    temperature: float = 0.0
    """Temperature of the single chain (0 = greedy)."""


@dataclass
class BestOfNConfig(SearchConfig):
    """Best-of-N: sample N chains, keep the best by a scorer or a vote."""

    n: int = 8
    """Chains sampled per prompt."""
    select: Select = "prm_min"
    """How the final chain is chosen (see the module docstring)."""

    def __post_init__(self) -> None:
        self.check_positive("n")

    def uses_scorer(self) -> bool:
        return self.select not in ("majority", "likelihood")


@dataclass
class SelfConsistencyConfig(SearchConfig):
    """Self-consistency: sample N chains, majority vote on the final answer."""

    n: int = 8
    """Chains sampled per prompt."""

    def __post_init__(self) -> None:
        self.check_positive("n")


def sample_chains(
    policy: PolicyLike,
    queries: Sequence[Query | str],
    cfg: SearchConfig,
    n: int,
    temperature: float | None = None,
):
    """One policy call: ``n`` whole chains under each root; returns (graphs, chains per graph)."""
    graphs = make_graphs(queries)
    chains = expand(
        policy, [(g, g.root) for g in graphs], n, cfg.sampling(temperature), cfg.step, cfg.budget, "chain"
    )
    for g in graphs:
        g.round += 1
    return graphs, chains


@register_strategy("greedy", GreedyConfig)
def greedy(
    policy: PolicyLike, queries: Sequence[Query | str], cfg: GreedyConfig, scorer: Scorer | None = None
):
    """Greedy CoT: one chain per prompt."""
    graphs, chains = sample_chains(policy, queries, cfg, 1)
    return [finish("greedy", g, c[0] if c else None, cfg) for g, c in zip(graphs, chains, strict=True)]


def best_of_chains(
    graphs, chains, select: str, cfg: SearchConfig, scorer: Scorer | None, name: str
) -> list[SearchResult]:
    """Score the sampled chains (one scorer call) and choose one per graph by ``select``."""
    targets = [(g, c) for g, cs in zip(graphs, chains, strict=True) for c in cs]
    if select == "likelihood":
        evaluate_likelihood(targets)
    elif select != "majority":
        need_scorer(scorer, name, f"select={select!r}")
        evaluate(scorer, targets, _HOW[select], cfg.step.step_sep, cfg.budget)
        for _, c in targets:
            c.reward = c.score  # a chain is terminal: its score is its outcome
    rule = (
        "majority"
        if select == "majority"
        else "weighted_majority"
        if select == "weighted_majority"
        else "score"
    )
    out = []
    for g, cs in zip(graphs, chains, strict=True):
        node, info = choose(g, cs, rule)  # type: ignore[arg-type]
        out.append(finish(name, g, node, cfg, select=select, **info))
    return out


@register_strategy("best_of_n", BestOfNConfig)
def best_of_n(
    policy: PolicyLike, queries: Sequence[Query | str], cfg: BestOfNConfig, scorer: Scorer | None = None
):
    """Best-of-N over whole chains (see the module docstring for ``select``)."""
    if cfg.select not in ("majority", "likelihood") and scorer is None:
        raise ConfigError(
            f"best_of_n with select={cfg.select!r} needs a scorer",
            where="search.scorer",
            fix="pass a scorer, or use select=majority / likelihood",
        )
    graphs, chains = sample_chains(policy, queries, cfg, cfg.n)
    return best_of_chains(graphs, chains, cfg.select, cfg, scorer, "best_of_n")


@register_strategy("self_consistency", SelfConsistencyConfig)
def self_consistency(
    policy: PolicyLike,
    queries: Sequence[Query | str],
    cfg: SelfConsistencyConfig,
    scorer: Scorer | None = None,
):
    """Self-consistency: majority vote over the answers of N sampled chains."""
    graphs, chains = sample_chains(policy, queries, cfg, cfg.n)
    return best_of_chains(graphs, chains, "majority", cfg, None, "self_consistency")
