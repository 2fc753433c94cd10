"""Traversal, update and structure-shaping operators: Select, Backtrack, Backpropagate, Prune,
Restructure, and answer voting (the non-generative Aggregate).

No model calls here: every function reads and updates a `SearchGraph` and records itself
in ``graph.trace``.

Selection scores (N = the parent's visits, n = the child's, Q = the child's value, P its
prior, c the exploration constant):

- UCT  (Kocsis & Szepesvari):   ``Q + c * sqrt(ln N / n)``, +inf for n = 0
- PUCT (AlphaZero):             ``Q + c * P * sqrt(N) / (1 + n)``

Backpropagation of a leaf value v along the path leaf -> root (d = distance from the
leaf): ``mean`` (running mean of v), ``max`` (best v seen), ``discounted`` (running mean
of ``gamma**d * v``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Literal

from posttrain.errors import ConfigError
from posttrain.search.structures import Node, SearchGraph

SelectRule = Literal["uct", "puct"]
Backup = Literal["mean", "max", "discounted"]
SELECTABLE = ("step", "refined", "aggregate")


def uct(q: float, parent_visits: int, visits: int, c: float) -> float:
    """UCT score ``q + c * sqrt(ln N / n)``; an unvisited child scores +inf."""
    if visits == 0:
        return math.inf
    return q + c * math.sqrt(math.log(max(parent_visits, 1)) / visits)


def puct(q: float, prior: float, parent_visits: int, visits: int, c: float) -> float:
    """PUCT score ``q + c * prior * sqrt(N) / (1 + n)``."""
    return q + c * prior * math.sqrt(parent_visits) / (1 + visits)


def selectable(graph: SearchGraph, node: Node) -> list[Node]:
    """Children that search may descend into (not pruned, not rollouts or lookaheads)."""
    return [k for k in graph.children(node) if k.kind in SELECTABLE]


def select_child(graph: SearchGraph, node: Node, rule: SelectRule = "puct", c: float = 1.0) -> Node | None:
    """Select: the child of ``node`` with the best UCT/PUCT score (first one on ties)."""
    kids = selectable(graph, node)
    if not kids:
        return None
    if rule == "uct":
        scores = [uct(k.q, node.visits, k.visits, c) for k in kids]
    elif rule == "puct":
        scores = [puct(k.q, k.prior, node.visits, k.visits, c) for k in kids]
    else:
        raise ConfigError(f"unknown selection rule {rule!r}", where="select.rule", fix="use 'uct' or 'puct'")
    return kids[max(range(len(kids)), key=scores.__getitem__)]


def select_leaf(graph: SearchGraph, rule: SelectRule = "puct", c: float = 1.0) -> Node:
    """Descend from the root by `select_child` to a node without selectable children."""
    node, path = graph.root, [0]
    while not node.terminal:
        nxt = select_child(graph, node, rule, c)
        if nxt is None:
            break
        node = nxt
        path.append(node.id)
    graph.record("select", [0], [node.id], rule=rule, c=c, path=path)
    return node


def select_top(graph: SearchGraph, nodes: Sequence[Node], k: int, key: str = "score") -> list[Node]:
    """Select the ``k`` best ``nodes`` by ``key`` (``score``, ``q``, ``prior``, ``reward``); stable."""

    def value(n: Node) -> float:
        v = getattr(n, key)
        return -math.inf if v is None else float(v)

    top = sorted(nodes, key=value, reverse=True)[: max(k, 0)]
    graph.record("select", [n.id for n in nodes], [n.id for n in top], key=key, k=k)
    return top


def backpropagate(
    graph: SearchGraph, node: Node, value: float, mode: Backup = "mean", gamma: float = 1.0
) -> list[int]:
    """Backpropagate ``value`` from ``node`` to the root (first parents); returns the ids updated."""
    if mode not in ("mean", "max", "discounted"):
        raise ConfigError(f"unknown backup {mode!r}", where="backup", fix="use mean, max or discounted")
    ids, cur, dist = [], node, 0
    while True:
        v = value * gamma**dist if mode == "discounted" else value
        cur.visits += 1
        if mode == "max":
            cur.value = v if cur.visits == 1 else max(cur.value, v)
        else:
            cur.value += (v - cur.value) / cur.visits
        ids.append(cur.id)
        if cur.parent is None:
            break
        cur, dist = graph.node(cur.parent), dist + 1
    graph.record("backpropagate", [node.id], ids, value=value, mode=mode, gamma=gamma)
    return ids


def _is_open(n: Node, threshold: float | None) -> bool:
    ok = not (n.terminal or n.pruned or n.children) and n.kind in SELECTABLE
    return ok and (threshold is None or (n.score is not None and n.score >= threshold))


def backtrack(graph: SearchGraph, node: Node, threshold: float | None = None) -> Node | None:
    """Backtrack: the best open child of ``node``, else of its nearest ancestor that has one.

    Open = not expanded, not terminal, not pruned, and scoring at least ``threshold``.
    Returns None when the whole tree is exhausted (depth-first search ends).
    """
    cur: Node | None = node
    while cur is not None:
        open_kids = [k for k in selectable(graph, cur) if _is_open(k, threshold)]
        if open_kids:
            best = max(open_kids, key=lambda k: k.score if k.score is not None else -math.inf)
            graph.record("backtrack", [node.id], [best.id], to_ancestor=cur.id, jumped=node.depth - cur.depth)
            return best
        cur = graph.node(cur.parent) if cur.parent is not None else None
    graph.record("backtrack", [node.id], [], exhausted=True)
    return None


def prune(
    graph: SearchGraph,
    nodes: Sequence[Node],
    *,
    keep_top: int | None = None,
    min_score: float | None = None,
    max_depth: int | None = None,
    dedup: bool = False,
) -> list[Node]:
    """Prune ``nodes`` by duplicate text (same parent), score threshold, depth and top-k score.

    Pruned nodes stay in the graph with ``pruned=True``; returns the kept ones in order.
    """
    kept: list[Node] = []
    seen: set[tuple[int | None, str]] = set()
    for n in nodes:
        key = (n.parent, " ".join(n.text.split()))
        bad = (dedup and key in seen) or (max_depth is not None and n.depth > max_depth)
        bad = bad or (min_score is not None and (n.score is None or n.score < min_score))
        seen.add(key)
        if bad:
            n.pruned = True
        else:
            kept.append(n)
    if keep_top is not None and len(kept) > keep_top:
        ranked = sorted(kept, key=lambda n: -math.inf if n.score is None else n.score, reverse=True)
        drop = {n.id for n in ranked[keep_top:]}
        for n in kept:
            n.pruned = n.pruned or n.id in drop
        kept = [n for n in kept if n.id not in drop]
    pruned = [n.id for n in nodes if n.pruned]
    graph.record("prune", [n.id for n in nodes], [n.id for n in kept], pruned=pruned, keep_top=keep_top,
                 min_score=min_score, max_depth=max_depth, dedup=dedup)  # fmt: skip
    return kept


def restructure(graph: SearchGraph, nodes: Sequence[Node], step_sep: str = "\n") -> SearchGraph:
    """Restructure: flatten the branches ending at ``nodes`` (best first) into one chain of insights.

    The new chain holds the distinct steps of those branches in order of first appearance,
    each node remembering where it came from (``meta["source"]``): the context of a next
    round (journey learning). The source graph's trace records the operation.
    """
    chain = SearchGraph(
        prompt=graph.prompt, kind="chain", meta={**graph.meta, "restructured_from": [n.id for n in nodes]}
    )
    seen: set[str] = set()
    tip = chain.root
    for leaf in nodes:
        for n in graph.path(leaf):
            for piece in n.text.split(step_sep) if step_sep else [n.text]:
                text = piece.strip()
                if text and text not in seen:
                    seen.add(text)
                    tip = chain.add(tip, text=text + step_sep, kind="insights", meta={"source": n.id})
    if tip.id:
        tip.text = tip.text[: len(tip.text) - len(step_sep)] if step_sep else tip.text
        tip.terminal = True
    graph.record("restructure", [n.id for n in nodes], [], insights=len(chain.nodes) - 1)
    return chain


def vote(
    answers: Sequence[str | None], weights: Sequence[float] | None = None
) -> tuple[str | None, dict[str, float]]:
    """Aggregate answers by (weighted) majority: the winner and each answer's total weight.

    None answers don't vote; ties go to the answer seen first. Unit weights give
    self-consistency; PRM scores as weights give weighted majority voting.
    """
    weights = [1.0] * len(answers) if weights is None else list(weights)
    totals: dict[str, float] = {}
    for a, w in zip(answers, weights, strict=True):
        if a is not None:
            totals[a] = totals.get(a, 0.0) + float(w)
    if not totals:
        return None, totals
    best = max(totals.values())
    return next(a for a, t in totals.items() if t == best), totals
