"""Test-time search: reasoning structures, operators, strategies, traces and a replay buffer.

Layout (the reasoning-language-model blueprint, seed 002):

- `structures`: nodes; chain / tree / graph / nested structures; step granularity.
- `budget`: cost accounting and hard per-prompt budgets.
- `protocols`: the policy (generation engine) and scorer interfaces.
- `operators` (Generate/Expand, Refine, Aggregate, critique, Evaluate) and
  `operators_tree` (Select UCT/PUCT, Backtrack, Backpropagate, Prune, Restructure, vote).
- strategies, registered by name (`get_strategy`, `run_search`): ``greedy``,
  ``best_of_n``, ``self_consistency`` (`sampling_strategies`), ``beam``, ``dvts`` (`beam`),
  ``mcts``, ``tot``, ``got``, ``self_refine``, and ``compute_optimal`` (`compute_optimal`:
  probe, estimate difficulty, give each difficulty bin its own strategy and budget).
- `scorers` (verifiers, reward functions, trained PRM/ORM, oracle PRM, AI judge) and
  `scripted` (a deterministic test environment). The policy is any generation engine,
  e.g. ``posttrain.rollout.engine.get_engine("hf", model=..., tokenizer=...)``.
- `traces` (results on disk), `export` (SFT / PRM / value / preference records),
  `replay` (the on-disk replay buffer).
- `compare` (``posttrain search RECIPE.yaml`` and `compare.strategy_table`: strategies side by
  side on a task set) and `report` (rows, markdown, matched-compute ratios, the SVG plot).
"""

from posttrain.search.base import SearchConfig, SearchResult, queries_from_problems
from posttrain.search.budget import Budget, Cost
from posttrain.search.protocols import PolicyLike, Query, Scorer, ScoreRequest, SearchCompletion
from posttrain.search.registry import get_strategy, register_strategy, run_search, strategy_names
from posttrain.search.structures import Node, SearchGraph, StepConfig

__all__ = [
    "Budget",
    "Cost",
    "Node",
    "PolicyLike",
    "Query",
    "ScoreRequest",
    "Scorer",
    "SearchCompletion",
    "SearchConfig",
    "SearchGraph",
    "SearchResult",
    "StepConfig",
    "get_strategy",
    "queries_from_problems",
    "register_strategy",
    "run_search",
    "strategy_names",
]
