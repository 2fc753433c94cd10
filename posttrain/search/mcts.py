"""Monte Carlo tree search over reasoning steps (AlphaZero-style, as in the RLM blueprint).

One simulation, for every prompt at once:

1. Select: descend from the root by PUCT (or UCT) to a node without children.
   A terminal leaf is not expanded: its value (outcome reward, else score) is backed up again.
   With ``parallel = P`` up to P distinct leaves per tree, each chosen under a virtual loss
   on the paths already chosen (a visit of value 0, undone before expansion).
2. Expand: ``expand_k`` next steps under every selected leaf -- ONE policy call for all trees.
   Priors are the siblings' softmax of length-normalised log-likelihoods.
3. Evaluate each new child: ``value="scorer"`` -- the scorer's score of the path (a value
   model or PRM; ``how`` reduces step scores); ``"rollout"`` -- roll each unfinished child out
   to the end (ONE more policy call, ``kind="rollout"`` nodes) and score the finished path
   as an outcome (a verifier); ``"mix"`` -- ``mix_weight * score + (1 - mix_weight) *
   rollout outcome`` (Silver et al.'s lambda mix). All scoring in ONE scorer call.
4. Backpropagate each child's value to the root (mean / max / discounted).

Each child counts as visited once when created. The final answer is the best terminal
path (highest outcome, then visits), the most-visited path, or the highest-value path.
Node visits, Q-values and rollout outcomes are what `posttrain.search.export` turns into
PRM step labels and value-model targets.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

from posttrain.search.base import SearchConfig, finish, live, make_graphs
from posttrain.search.operators import Aggregation, evaluate, expand
from posttrain.search.operators_tree import Backup, SelectRule, backpropagate, prune, select_leaf, selectable
from posttrain.search.protocols import PolicyLike, Query, Scorer
from posttrain.search.registry import register_strategy
from posttrain.search.structures import Node, SearchGraph


@dataclass
class MCTSConfig(SearchConfig):
    """MCTS with a policy (expand) and a value model / PRM / verifier (evaluate)."""

    n_simulations: int = 16
    """Simulations (expansion rounds) per prompt."""
    expand_k: int = 3
    """Children generated at each expanded leaf."""
    rule: SelectRule = "puct"
    """Selection score: `puct` (with policy priors) or `uct`."""
    c: float = 1.0
    """Exploration constant."""
    backup: Backup = "mean"
    """Backpropagation: running mean, max, or discounted mean."""
    gamma: float = 1.0
    """Discount per level for `discounted` backup."""
    value: Literal["scorer", "rollout", "mix"] = "scorer"
    """Leaf value: the scorer's path score, a rollout's outcome, or a mix of both."""
    mix_weight: float = 0.5
    """Weight of the scorer's value in `mix`."""
    rollout_temperature: float = 0.0
    """Temperature of rollouts (0 = greedy)."""
    how: Aggregation = "last"
    """How a path's step scores become its score."""
    final: Literal["best_terminal", "visits", "value"] = "best_terminal"
    """Final answer: best finished path, most-visited path, or highest-value path."""
    parallel: int = 1
    """Leaves selected per tree per simulation (virtual loss keeps them apart); all of them
    are expanded in the same policy call."""

    def __post_init__(self) -> None:
        self.check_positive("n_simulations", "expand_k", "parallel")


def _leaf_value(node: Node) -> float:
    return node.reward if node.reward is not None else node.q


def _evaluate_children(policy, scorer, kids: list[tuple[SearchGraph, Node]], cfg: MCTSConfig) -> list[float]:
    """Values of new children (see the module docstring, step 3)."""
    rolls: list[tuple[SearchGraph, Node] | None] = [None] * len(kids)
    if cfg.value in ("rollout", "mix"):
        open_ = [i for i, (_, c) in enumerate(kids) if not c.terminal]
        got = expand(policy, [kids[i] for i in open_], 1, cfg.sampling(cfg.rollout_temperature), cfg.step,
                     cfg.budget, "chain", kind="rollout")  # fmt: skip
        for i, r in zip(open_, got, strict=True):
            rolls[i] = (kids[i][0], r[0]) if r else None
    extra = [r for r in rolls if r is not None]
    evaluate(scorer, list(kids) + extra, cfg.how, cfg.step.step_sep, cfg.budget)
    values = []
    for (_, c), r in zip(kids, rolls, strict=True):
        if c.terminal:
            c.reward = c.score
        if r is not None:
            r[1].reward = r[1].score
        outcome = c.reward if c.terminal else (r[1].reward if r is not None else None)
        score = c.score if c.score is not None else 0.0
        if cfg.value == "scorer" or outcome is None:
            values.append(score)
        elif cfg.value == "rollout":
            values.append(outcome)
        else:
            values.append(cfg.mix_weight * score + (1 - cfg.mix_weight) * outcome)
    return values


def _select_leaves(g: SearchGraph, cfg: MCTSConfig) -> list[Node]:
    """Up to ``cfg.parallel`` distinct leaves; a virtual loss on each chosen path (one visit of
    value 0, undone afterwards) steers the next selection elsewhere."""
    leaves: list[Node] = []
    saved: dict[int, tuple[int, float]] = {}
    for _ in range(cfg.parallel):
        leaf = select_leaf(g, cfg.rule, cfg.c)
        if any(leaf is x for x in leaves):
            break
        leaves.append(leaf)
        node: Node | None = leaf
        while node is not None:
            saved.setdefault(node.id, (node.visits, node.value))
            node.value, node.visits = node.q * node.visits / (node.visits + 1), node.visits + 1
            node = g.node(node.parent) if node.parent is not None else None
    for i, (visits, value) in saved.items():
        g.node(i).visits, g.node(i).value = visits, value
    return leaves


def _simulate(policy, scorer, graphs: list[SearchGraph], cfg: MCTSConfig) -> bool:
    """One simulation for every graph; False when no graph could be expanded."""
    to_expand = []
    for g in graphs:
        for leaf in _select_leaves(g, cfg):
            if leaf.terminal:
                backpropagate(g, leaf, _leaf_value(leaf), cfg.backup, cfg.gamma)
            else:
                to_expand.append((g, leaf))
        g.round += 1
    if not to_expand:
        return any(selectable(g, g.root) for g in graphs)
    grown = expand(policy, to_expand, cfg.expand_k, cfg.sampling(), cfg.step, cfg.budget)
    kids = [(g, c) for (g, _), ks in zip(to_expand, grown, strict=True) for c in prune(g, ks, dedup=True)]
    if not kids:
        return False
    for (g, c), v in zip(kids, _evaluate_children(policy, scorer, kids, cfg), strict=True):
        backpropagate(g, c, v, cfg.backup, cfg.gamma)
    return True


def _final(g: SearchGraph, rule: str) -> Node | None:
    terminals = [n for n in g.terminals(("step", "rollout")) if not n.pruned]
    if rule == "best_terminal" and terminals:
        return max(
            terminals,
            key=lambda n: (_leaf_value(n), g.node(n.parent).visits if n.kind == "rollout" else n.visits),
        )
    node = g.root
    while kids := selectable(g, node):
        node = max(kids, key=lambda k: (k.visits, k.q) if rule == "visits" else (k.q, k.visits))
    if node.id == 0:
        return None
    rolls = [g.node(c) for c in node.children if g.node(c).kind == "rollout"]
    return max(rolls, key=_leaf_value) if not node.terminal and rolls else node


@register_strategy("mcts", MCTSConfig, needs_scorer=True)
def mcts(policy: PolicyLike, queries: Sequence[Query | str], cfg: MCTSConfig, scorer: Scorer | None):
    """MCTS over reasoning steps (see the module docstring)."""
    graphs = make_graphs(queries)
    for _ in range(cfg.n_simulations):
        active = live(graphs, cfg, policy)
        if not active or not _simulate(policy, scorer, active, cfg):
            break
    out = []
    for g in graphs:
        node = _final(g, cfg.final)
        out.append(finish("mcts", g, node, cfg, root_visits=g.root.visits, root_value=g.root.value))
    return out
