"""Tree-of-Thoughts (Yao et al. 2023): breadth-first or depth-first search with a value threshold.

``bfs``: each level expands every kept node into ``expand_k`` thoughts (ONE policy call for
all prompts), scores them (ONE scorer call), prunes those below ``threshold`` and keeps
the best ``breadth``; finished paths are collected; the best-scored one is the answer.

``dfs``: each prompt has a current node. A round expands every current node (ONE call),
scores the children (ONE call) and prunes those below ``threshold``. A finished child at or
above ``accept`` ends that prompt's search; otherwise Backtrack picks the best open child
of the current node or, failing that, of the nearest ancestor that has one. The search
ends when a solution is accepted, the tree is exhausted, ``max_rounds`` pass, or the
budget runs out; then the best-scored finished path (else the best node seen) is chosen.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

from posttrain.search.base import SearchConfig, choose, finish, live, make_graphs
from posttrain.search.beam import score_candidates
from posttrain.search.operators import Aggregation, expand
from posttrain.search.operators_tree import backtrack, prune, select_top
from posttrain.search.protocols import PolicyLike, Query, Scorer
from posttrain.search.registry import register_strategy
from posttrain.search.structures import Node, SearchGraph


@dataclass
class ToTConfig(SearchConfig):
    """Tree-of-Thoughts search."""

    mode: Literal["bfs", "dfs"] = "bfs"
    """Breadth-first (level by level) or depth-first with backtracking."""
    expand_k: int = 3
    """Thoughts generated per expanded node."""
    breadth: int = 2
    """BFS: nodes kept per level."""
    threshold: float | None = 0.5
    """Thoughts scoring below it are pruned (null = keep all)."""
    accept: float = 0.5
    """DFS: a finished path scoring at least this ends the search."""
    max_rounds: int = 24
    """Expansion rounds at most."""
    how: Aggregation = "last"
    """How a path's step scores become its score."""

    def __post_init__(self) -> None:
        self.check_positive("expand_k", "breadth", "max_rounds")


def _grow(policy, scorer, targets: list[tuple[SearchGraph, Node]], cfg: ToTConfig) -> dict[int, list[Node]]:
    """Expand targets (one call), score children (one call), prune below threshold."""
    kids = expand(policy, targets, cfg.expand_k, cfg.sampling(), cfg.step, cfg.budget)
    by_graph: dict[int, list[Node]] = {}
    for (g, _), ks in zip(targets, kids, strict=True):
        by_graph.setdefault(id(g), []).extend(ks)
    graphs = {id(g): g for g, _ in targets}
    cands = [(graphs[k], c) for k, cs in by_graph.items() for c in prune(graphs[k], cs, dedup=True)]
    score_candidates(policy, scorer, cands, cfg, 0, cfg.how)
    return {
        k: prune(graphs[k], [c for g, c in cands if id(g) == k], min_score=cfg.threshold) for k in by_graph
    }


def _bfs(policy, scorer, graphs: list[SearchGraph], cfg: ToTConfig) -> dict[int, list[Node]]:
    frontier = {id(g): [g.root] for g in graphs}
    done: dict[int, list[Node]] = {id(g): [] for g in graphs}
    for _ in range(cfg.max_rounds):
        targets = [(g, n) for g in live(graphs, cfg, policy) for n in frontier[id(g)]]
        if not targets:
            break
        kept = _grow(policy, scorer, targets, cfg)
        for g in graphs:
            mine = kept.get(id(g), [])
            done[id(g)] += [c for c in mine if c.terminal]
            frontier[id(g)] = (
                select_top(g, [c for c in mine if not c.terminal], cfg.breadth) if id(g) in kept else []
            )
            g.round += 1
    return done


def _dfs(policy, scorer, graphs: list[SearchGraph], cfg: ToTConfig) -> dict[int, list[Node]]:
    current: dict[int, Node | None] = {id(g): g.root for g in graphs}
    done: dict[int, list[Node]] = {id(g): [] for g in graphs}
    for _ in range(cfg.max_rounds):
        targets = [(g, current[id(g)]) for g in live(graphs, cfg, policy) if current[id(g)] is not None]
        if not targets:
            break
        kept = _grow(policy, scorer, targets, cfg)  # type: ignore[arg-type]
        for g, node in targets:
            finished = [c for c in kept.get(id(g), []) if c.terminal]
            done[id(g)] += finished
            if any((c.score or 0.0) >= cfg.accept for c in finished):
                current[id(g)] = None
            else:
                current[id(g)] = backtrack(g, node, cfg.threshold)  # type: ignore[arg-type]
            g.round += 1
    return done


@register_strategy("tot", ToTConfig, needs_scorer=True)
def tot(policy: PolicyLike, queries: Sequence[Query | str], cfg: ToTConfig, scorer: Scorer | None):
    """Tree-of-Thoughts, BFS or DFS (see the module docstring)."""
    graphs = make_graphs(queries)
    done = (_bfs if cfg.mode == "bfs" else _dfs)(policy, scorer, graphs, cfg)
    out = []
    for g in graphs:
        pool = done[id(g)] or [n for n in g.nodes[1:] if n.score is not None]
        node, _ = choose(g, pool, "score")
        out.append(finish("tot", g, node, cfg, mode=cfg.mode, finished=len(done[id(g)])))
    return out
