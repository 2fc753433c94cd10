"""Step-level beam search with a PRM (optional lookahead) and DVTS (a forest of greedy subtrees).

``beam`` (Snell et al. 2024): keep ``beam_width`` partial paths; each round expands every
kept path into ``expand_k`` next steps (ONE policy call for all prompts), scores the new
steps with the scorer (ONE call), sets finished paths aside and keeps the best
``beam_width`` unfinished ones, until none is left (``max_depth`` forces paths to finish)
or the budget is spent. With ``lookahead = L`` every candidate is first rolled forward L steps at
temperature 0 (L more calls) and ranked by the score of the rolled-out tip (the rollout
nodes stay in the tree as ``kind="lookahead"``, never selected).

``dvts`` (diverse verifier tree search, Beeching et al. 2024): ``n_subtrees`` independent
subtrees under one root; each round expands every subtree head into ``expand_k`` steps
and moves the head to its best-scored child (greedy per subtree, diverse across them).

Both finish with the best-scored finished path, or a weighted majority vote over them.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from posttrain.search.base import FinalRule, SearchConfig, choose, finish, live, make_graphs
from posttrain.search.operators import Aggregation, evaluate, expand
from posttrain.search.operators_tree import prune, select_top
from posttrain.search.protocols import PolicyLike, Query, Scorer
from posttrain.search.registry import register_strategy
from posttrain.search.structures import Node, SearchGraph


@dataclass
class BeamConfig(SearchConfig):
    """Step-level beam search guided by a process reward model."""

    beam_width: int = 4
    """Unfinished paths kept per round."""
    expand_k: int = 4
    """Next steps sampled from each kept path."""
    lookahead: int = 0
    """Greedy steps rolled forward before scoring a candidate (0 = score the step itself)."""
    how: Aggregation = "last"
    """How a path's step scores become its score: last step, min, product or mean."""
    final: FinalRule = "score"
    """Final choice among finished paths: best score or (weighted) majority."""

    def __post_init__(self) -> None:
        self.check_positive("beam_width", "expand_k")


@dataclass
class DVTSConfig(SearchConfig):
    """Diverse verifier tree search: independent greedy subtrees under one root."""

    n_subtrees: int = 4
    """Independent subtrees per prompt."""
    expand_k: int = 4
    """Next steps sampled at each subtree head per round."""
    how: Aggregation = "last"
    """How a path's step scores become its score."""
    final: FinalRule = "score"
    """Final choice among the subtrees' finished paths."""

    def __post_init__(self) -> None:
        self.check_positive("n_subtrees", "expand_k")


def score_candidates(policy, scorer, cands: list[tuple[SearchGraph, Node]], cfg, lookahead: int, how) -> None:
    """Score candidates in one scorer call, after rolling each forward ``lookahead`` greedy steps."""
    tips = list(cands)
    for _ in range(lookahead):
        open_ = [i for i, (_, t) in enumerate(tips) if not t.terminal]
        if not open_:
            break
        grown = expand(
            policy, [tips[i] for i in open_], 1, cfg.sampling(0.0), cfg.step, cfg.budget, kind="lookahead"
        )
        for i, kids in zip(open_, grown, strict=True):
            if kids:
                tips[i] = (tips[i][0], kids[0])
    evaluate(scorer, tips, how, cfg.step.step_sep, cfg.budget)
    for (g, c), (_, tip) in zip(cands, tips, strict=True):
        if tip is not c:
            c.score = tip.score
            g.record("evaluate", [c.id], [], how="lookahead", via=tip.id, value=c.score)
        if c.terminal:
            c.reward = c.score


@register_strategy("beam", BeamConfig, needs_scorer=True)
def beam(policy: PolicyLike, queries: Sequence[Query | str], cfg: BeamConfig, scorer: Scorer | None):
    """Step-level beam search (see the module docstring)."""
    graphs = make_graphs(queries)
    beams = {id(g): [g.root] for g in graphs}
    done: dict[int, list[Node]] = {id(g): [] for g in graphs}
    while True:
        active = [g for g in live(graphs, cfg, policy) if beams[id(g)]]
        if not active:
            break
        targets = [(g, n) for g in active for n in beams[id(g)]]
        kids = expand(policy, targets, cfg.expand_k, cfg.sampling(), cfg.step, cfg.budget)
        grown: dict[int, list[Node]] = {id(g): [] for g in active}
        for (g, _), ks in zip(targets, kids, strict=True):
            grown[id(g)] += ks
        cands = [(g, c) for g in active for c in prune(g, grown[id(g)], dedup=True)]
        score_candidates(policy, scorer, cands, cfg, cfg.lookahead, cfg.how)
        for g in active:
            mine = [c for gg, c in cands if gg is g]
            done[id(g)] += [c for c in mine if c.terminal]
            beams[id(g)] = select_top(g, [c for c in mine if not c.terminal], cfg.beam_width)
            g.round += 1
    out = []
    for g in graphs:
        finished = done[id(g)] or beams[id(g)]
        node, info = choose(g, finished, cfg.final)
        out.append(finish("beam", g, node, cfg, finished=len(done[id(g)]), **info))
    return out


@register_strategy("dvts", DVTSConfig, needs_scorer=True)
def dvts(policy: PolicyLike, queries: Sequence[Query | str], cfg: DVTSConfig, scorer: Scorer | None):
    """DVTS: greedy PRM-guided descent in ``n_subtrees`` independent subtrees per prompt."""
    graphs = make_graphs(queries)
    heads = {id(g): [g.root] * cfg.n_subtrees for g in graphs}
    while True:
        alive = {id(g) for g in live(graphs, cfg, policy)}
        targets = [
            (g, j) for g in graphs if id(g) in alive for j, h in enumerate(heads[id(g)]) if not h.terminal
        ]
        if not targets:
            break
        kids = expand(policy, [(g, heads[id(g)][j]) for g, j in targets], cfg.expand_k, cfg.sampling(), cfg.step,
                      cfg.budget)  # fmt: skip
        flat = [(g, c) for (g, j), ks in zip(targets, kids, strict=True) for c in ks]
        for (_, j), ks in zip(targets, kids, strict=True):
            for c in ks:
                c.meta["subtree"] = j
        score_candidates(policy, scorer, flat, cfg, 0, cfg.how)
        moved = False
        for (g, j), ks in zip(targets, kids, strict=True):
            if ks:
                heads[id(g)][j] = select_top(g, ks, 1)[0]
                moved = True
        for g in graphs:
            g.round += 1
        if not moved:
            break
    out = []
    for g in graphs:
        finished = [h for h in heads[id(g)] if h.id != 0]
        node, info = choose(g, [h for h in finished if h.terminal] or finished, cfg.final)
        out.append(finish("dvts", g, node, cfg, subtrees=cfg.n_subtrees, **info))
    return out
