"""Rubric rewards: several criteria combined into one score.

Each `Criterion` has a weight and exactly one source: a registered reward (by name), a
regular expression (1.0 when ``re.search`` finds it in the completion; ``negate`` flips
it, for "must not contain"), or a question for a judge. A judge is a batched callable
``judge(prompts, completions, question) -> list[float]`` (scores in [0, 1]); an LLM judge
plugs in here. Aggregation of criterion scores ``s_k`` with weights ``w_k``:

- ``weighted_sum``: ``sum_k w_k * s_k``
- ``mean``: ``sum_k w_k * s_k / sum_k w_k`` (the weighted mean; plain mean for equal weights)

``info["parts"]`` holds each criterion's unweighted score.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal

from posttrain.errors import ConfigError
from posttrain.rewards.registry import RewardResult, as_results, get_reward

Judge = Callable[[list, list[str], str], Sequence[float]]


@dataclass(frozen=True)
class Criterion:
    """One rubric line: a name, a weight, and one of ``reward``, ``pattern`` or ``question``."""

    name: str
    weight: float = 1.0
    reward: str | None = None
    """A registered reward name (its score is used as is)."""
    pattern: str | None = None
    """A regex searched in the completion: 1.0 if found, else 0.0."""
    negate: bool = False
    """With ``pattern``: 1.0 if NOT found."""
    question: str | None = None
    """A question for the rubric's judge."""


class Rubric:
    """Score completions against weighted criteria; usable as a reward function."""

    def __init__(
        self,
        criteria: Sequence[Criterion],
        aggregate: Literal["weighted_sum", "mean"] = "weighted_sum",
        judge: Judge | None = None,
    ):
        if not criteria:
            raise ConfigError("a rubric needs at least one criterion", where="criteria")
        if aggregate not in ("weighted_sum", "mean"):
            raise ConfigError(
                f"unknown aggregate {aggregate!r}", where="aggregate", fix="weighted_sum or mean"
            )
        names = [c.name for c in criteria]
        if len(set(names)) != len(names):
            raise ConfigError(f"criterion names repeat: {names}", where="criteria")
        for c in criteria:
            _check_criterion(c, judge)
        if aggregate == "mean" and sum(c.weight for c in criteria) <= 0:
            raise ConfigError("aggregate 'mean' needs a positive total weight", where="criteria")
        self.criteria = list(criteria)
        self.aggregate = aggregate
        self.judge = judge
        self._patterns = {c.name: re.compile(c.pattern) for c in criteria if c.pattern is not None}

    def _scores(
        self, c: Criterion, prompts: list, completions: list[str], metadata: list[dict]
    ) -> list[float]:
        if c.reward is not None:
            out = get_reward(c.reward)(prompts, completions, metadata)
            return [r.score for r in as_results(out, len(completions), c.reward)]
        if c.pattern is not None:
            found = [self._patterns[c.name].search(text) is not None for text in completions]
            return [float(f != c.negate) for f in found]
        scores = [float(s) for s in self.judge(prompts, completions, c.question)]  # type: ignore[misc]
        if len(scores) != len(completions):
            raise ConfigError(
                f"judge returned {len(scores)} scores for {len(completions)} rows", where=c.name
            )
        return scores

    def score(self, prompts: list, completions: list[str], metadata: list[dict]) -> list[RewardResult]:
        """One `RewardResult` per row: the aggregated score and each criterion's part."""
        parts = {c.name: self._scores(c, prompts, completions, metadata) for c in self.criteria}
        total_weight = sum(c.weight for c in self.criteria)
        out = []
        for i in range(len(completions)):
            row = {c.name: parts[c.name][i] for c in self.criteria}
            value = sum(c.weight * row[c.name] for c in self.criteria)
            if self.aggregate == "mean":
                value /= total_weight
            why = ", ".join(f"{name}={s:g}" for name, s in row.items())
            out.append(RewardResult(value, {"why": f"{self.aggregate}: {why}", "parts": row}))
        return out

    __call__ = score


def _check_criterion(c: Criterion, judge: Judge | None) -> None:
    sources = [s for s in (c.reward, c.pattern, c.question) if s is not None]
    if len(sources) != 1:
        raise ConfigError(
            f"criterion {c.name!r} needs exactly one of reward, pattern or question",
            where=f"criteria.{c.name}",
        )
    if not isinstance(c.weight, int | float) or isinstance(c.weight, bool) or not math.isfinite(c.weight):
        raise ConfigError(f"criterion {c.name!r} has weight {c.weight!r}", where=f"criteria.{c.name}.weight")
    if c.reward is not None:
        get_reward(c.reward)
    if c.pattern is not None:
        try:
            re.compile(c.pattern)
        except re.error as exc:
            raise ConfigError(
                f"criterion {c.name!r}: bad regex ({exc})", where=f"criteria.{c.name}.pattern"
            ) from exc
    if c.question is not None and judge is None:
        raise ConfigError(
            f"criterion {c.name!r} asks a judge question but the rubric has no judge",
            where=f"criteria.{c.name}.question",
            fix="pass judge=... to Rubric, or use a reward or pattern criterion",
        )
