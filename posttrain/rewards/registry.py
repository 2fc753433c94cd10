"""The reward-function registry and per-row dispatch.

A reward function is a plain callable over a batch::

    fn(prompts: list, completions: list[str], metadata: list[dict]) -> list[RewardResult]

(a list of floats is accepted too and wrapped). `register_reward` adds one by name,
`get_reward` finds it (a task name from the task suite also resolves, to the ``task``
reward), `score_batch` scores a mixed batch by each row's ``metadata["scorer"]`` (rows
grouped by scorer, one batched call per group), `combine` builds a weighted sum.
The built-in rewards (``math``, ``task``, ``format``, ``overlong``, ``code``,
``code_partial``) live in `posttrain.rewards.builtin` and are added on first lookup.
"""

from __future__ import annotations

import difflib
import importlib
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from posttrain.errors import ConfigError, DataError


@dataclass(frozen=True)
class RewardResult:
    """A scalar reward and what produced it (``info["why"]`` is a short human-readable reason)."""

    score: float
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def why(self) -> str:
        return str(self.info.get("why", ""))


RewardFn = Callable[[list, list[str], list[dict]], Sequence["RewardResult | float"]]
REWARDS: dict[str, RewardFn] = {}


def register_reward(name: str, *, replace: bool = False) -> Callable[[RewardFn], RewardFn]:
    """Decorator registering a reward function under ``name``; re-registering needs ``replace``."""

    def add(fn: RewardFn) -> RewardFn:
        _load_builtins()
        if name in REWARDS and not replace and REWARDS[name] is not fn:
            raise ConfigError(
                f"reward {name!r} is already registered",
                where="rewards",
                fix="pick another name or pass replace=True",
            )
        REWARDS[name] = fn
        return fn

    return add


def _load_builtins() -> None:
    """Add the built-in rewards (imported on first use); a user's same-named one wins."""
    for name, fn in importlib.import_module("posttrain.rewards.builtin").BUILTINS.items():
        REWARDS.setdefault(name, fn)


def reward_names() -> list[str]:
    """Registered reward names, sorted (built-ins included)."""
    _load_builtins()
    return sorted(REWARDS)


def get_reward(name: str) -> RewardFn:
    """The reward called ``name``, or the ``task`` reward for a task-suite name; else a ConfigError."""
    _load_builtins()
    if name in REWARDS:
        return REWARDS[name]
    from posttrain.data.tasks import TASKS

    if name in TASKS:
        return REWARDS["task"]
    valid = sorted(REWARDS) + sorted(TASKS)
    close = difflib.get_close_matches(name, valid, n=1)
    hint = f"did you mean {close[0]!r}? " if close else ""
    raise ConfigError(
        f"unknown reward {name!r}", where="scorer", fix=f"{hint}valid rewards: {', '.join(valid)}"
    )


def as_results(values: Sequence[RewardResult | float], n: int, name: str) -> list[RewardResult]:
    """Check a reward function's output (``n`` results or numbers) and wrap numbers."""
    if isinstance(values, str | bytes) or len(values) != n:
        got = "a string" if isinstance(values, str | bytes) else f"{len(values)} results"
        raise ConfigError(f"reward {name!r} returned {got} for {n} rows", where=name)
    out = []
    for v in values:
        if isinstance(v, RewardResult):
            out.append(v)
        elif isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v):
            out.append(RewardResult(float(v), {"why": ""}))
        else:
            raise ConfigError(
                f"reward {name!r} returned {v!r}; expected RewardResult or a finite number", where=name
            )
    return out


def score_batch(
    prompts: Sequence[Any], completions: Sequence[str], metadata: Sequence[dict], default: str | None = None
) -> list[RewardResult]:
    """Score each row with the reward named by its ``metadata["scorer"]`` (or ``default``).

    Rows are grouped by scorer; each group is scored by one batched call, and results
    come back in row order with ``info["scorer"]`` set.
    """
    if not len(prompts) == len(completions) == len(metadata):
        raise DataError(
            f"{len(prompts)} prompts, {len(completions)} completions, {len(metadata)} metadata rows"
        )
    groups: dict[str, list[int]] = {}
    for i, meta in enumerate(metadata):
        scorer = meta.get("scorer", default) if isinstance(meta, dict) else None
        if not isinstance(scorer, str):
            raise DataError(
                "row has no scorer", where=f"metadata[{i}]", fix="set metadata.scorer or pass default="
            )
        groups.setdefault(scorer, []).append(i)
    results: list[RewardResult | None] = [None] * len(metadata)
    for scorer, rows in groups.items():
        fn = get_reward(scorer)
        out = fn([prompts[i] for i in rows], [completions[i] for i in rows], [metadata[i] for i in rows])
        for i, res in zip(rows, as_results(out, len(rows), scorer), strict=True):
            results[i] = RewardResult(res.score, {**res.info, "scorer": scorer})
    return results  # type: ignore[return-value]


def combine(weights: dict[str, float]) -> RewardFn:
    """A reward whose score is ``sum_k weights[k] * reward_k`` over registered rewards.

    ``info["parts"]`` holds each part's unweighted score; names are checked now.
    """
    if not weights:
        raise ConfigError("combine needs at least one reward", where="weights")
    fns = {name: get_reward(name) for name in weights}
    for name, w in weights.items():
        if not isinstance(w, int | float) or isinstance(w, bool) or not math.isfinite(w):
            raise ConfigError(
                f"weight of {name!r} must be a finite number, got {w!r}", where=f"weights.{name}"
            )

    def combined(prompts: list, completions: list[str], metadata: list[dict]) -> list[RewardResult]:
        parts = {
            name: as_results(fn(prompts, completions, metadata), len(completions), name)
            for name, fn in fns.items()
        }
        out = []
        for i in range(len(completions)):
            scores = {name: parts[name][i].score for name in fns}
            why = " + ".join(f"{weights[n]:g}*{n}({scores[n]:g}: {parts[n][i].why})" for n in fns)
            out.append(RewardResult(sum(weights[n] * scores[n] for n in fns), {"why": why, "parts": scores}))
        return out

    return combined
