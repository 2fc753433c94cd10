"""The search-strategy registry: name -> (function, config class).

Built-ins (added on first lookup): ``greedy``, ``best_of_n``, ``self_consistency``,
``beam``, ``dvts``, ``mcts``, ``tot``, ``got``, ``self_refine``, ``compute_optimal``.
`register_strategy` adds one; `get_strategy` finds it (unknown names list the valid ones);
`run_search` builds the config (a dataclass, a dict checked strictly like a recipe section,
or None for defaults), checks that a scorer is given where the strategy or its config needs
one (`requires_scorer`; a config says so with ``uses_scorer()``), and runs the strategy over
a batch of queries.

Seam for compute-optimal scaling (`posttrain.search.compute_optimal`): a planner picks, per
prompt (per estimated difficulty bin), a strategy name, a config and a `Budget`, then calls
`run_search` once per bin; every result carries its `Cost`, so accuracy can be reported
against compute.
"""

from __future__ import annotations

import difflib
import importlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from posttrain.errors import ConfigError
from posttrain.search.base import SearchConfig, SearchResult
from posttrain.search.protocols import PolicyLike, Query, Scorer

StrategyFn = Callable[[PolicyLike, Sequence[Query | str], Any, Scorer | None], list[SearchResult]]
_BUILTIN_MODULES = (
    "posttrain.search.sampling_strategies",
    "posttrain.search.beam",
    "posttrain.search.mcts",
    "posttrain.search.tot",
    "posttrain.search.got",
    "posttrain.search.self_refine",
    "posttrain.search.compute_optimal",
)


@dataclass(frozen=True)
class Strategy:
    """A registered strategy: its function, config class, and whether it needs a scorer."""

    name: str
    fn: StrategyFn
    config_cls: type
    needs_scorer: bool


STRATEGIES: dict[str, Strategy] = {}


def register_strategy(
    name: str, config_cls: type, needs_scorer: bool = False, *, replace: bool = False
) -> Callable[[StrategyFn], StrategyFn]:
    """Decorator registering ``fn`` under ``name`` with its config class."""

    def add(fn: StrategyFn) -> StrategyFn:
        if name in STRATEGIES and not replace and STRATEGIES[name].fn is not fn:
            raise ConfigError(
                f"strategy {name!r} is already registered", where="search.strategy", fix="pass replace=True"
            )
        STRATEGIES[name] = Strategy(name, fn, config_cls, needs_scorer)
        return fn

    return add


def _load_builtins() -> None:
    for module in _BUILTIN_MODULES:
        importlib.import_module(module)


def strategy_names() -> list[str]:
    _load_builtins()
    return sorted(STRATEGIES)


def get_strategy(name: str) -> Strategy:
    """The strategy called ``name``; unknown names raise a ConfigError listing the valid ones."""
    _load_builtins()
    if name in STRATEGIES:
        return STRATEGIES[name]
    close = difflib.get_close_matches(name, list(STRATEGIES), n=1)
    hint = f"did you mean {close[0]!r}? " if close else ""
    raise ConfigError(
        f"unknown search strategy {name!r}",
        where="search.strategy",
        fix=f"{hint}valid strategies: {', '.join(sorted(STRATEGIES))}",
    )


def build_config(strategy: Strategy, config: Any = None) -> SearchConfig:
    """``config`` as the strategy's config class (None = defaults; a dict is checked strictly)."""
    from posttrain.config import from_dict

    if config is None:
        return strategy.config_cls()
    if isinstance(config, dict):
        return from_dict(strategy.config_cls, config, prefix="search.", source=f"search.{strategy.name}")
    if not isinstance(config, strategy.config_cls):
        raise ConfigError(
            f"strategy {strategy.name!r} takes a {strategy.config_cls.__name__}, got {type(config).__name__}",
            where="search.config",
        )
    return config


def requires_scorer(strategy: Strategy, cfg: Any) -> bool:
    """Whether ``strategy`` run with ``cfg`` needs a scorer (its registration, or its config:
    e.g. best_of_n with ``select="verifier"``)."""
    uses = getattr(cfg, "uses_scorer", None)
    return strategy.needs_scorer or bool(uses is not None and uses())


def run_search(
    name: str,
    policy: PolicyLike,
    queries: Sequence[Query | str],
    scorer: Scorer | None = None,
    config: Any = None,
) -> list[SearchResult]:
    """Run strategy ``name`` over ``queries`` (all prompts batched together); one result each."""
    strategy = get_strategy(name)
    cfg = build_config(strategy, config)
    if scorer is None and requires_scorer(strategy, cfg):
        raise ConfigError(
            f"strategy {name!r} needs a scorer with this config",
            where="search.scorer",
            fix="pass a PRM/value model, a verifier (posttrain.search.scorers.task_verifier()) or a judge",
        )
    return strategy.fn(policy, queries, cfg, scorer)
