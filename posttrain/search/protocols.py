"""The narrow interfaces search needs: a policy that generates, a scorer that scores steps.

`PolicyLike` is the generation-engine protocol (``posttrain.rollout.engine``'s backends
implement it, and so does `posttrain.search.scripted.ScriptedPolicy`): one call takes every prompt of an expansion round, as text or token ids, and returns
``len(prompts) * params.n`` completions tagged with ``prompt_index`` / ``sample_index``.

`Scorer` is the evaluation protocol shared by value models, PRMs, ORMs, verifiers and AI
judges: one call scores a batch of partial or finished paths and returns one score per
step of each path (an ORM or verifier fills only the last entry with meaning). Parameter
counts for FLOP estimates come from `posttrain.search.budget.param_count`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

from posttrain.rollout.sampling import SamplingParams


@runtime_checkable
class CompletionLike(Protocol):
    """What search reads from one generated sample."""

    prompt_index: int
    sample_index: int
    prompt_ids: list[int]
    token_ids: list[int]
    text: str
    logprobs: list[float] | None
    finish_reason: str


@runtime_checkable
class PolicyLike(Protocol):
    """A generation engine: ``generate(prompts, params) -> completions`` (one batched call)."""

    def generate(
        self, prompts: list[str | list[int]], params: SamplingParams
    ) -> Sequence[CompletionLike]: ...


@dataclass
class SearchCompletion:
    """A plain `CompletionLike` (what the scripted policy returns)."""

    prompt_index: int
    sample_index: int
    prompt_ids: list[int]
    token_ids: list[int]
    text: str
    logprobs: list[float] | None = None
    finish_reason: str = "stop"


@dataclass
class ScoreRequest:
    """One path to score: the query, its steps so far, the full generated text, terminal or not."""

    prompt: str
    steps: list[str]
    text: str
    terminal: bool
    metadata: dict[str, Any] = field(default_factory=dict)


@runtime_checkable
class Scorer(Protocol):
    """``score(requests) -> one list of per-step scores per request`` (one batched call)."""

    def score(self, requests: list[ScoreRequest]) -> list[list[float]]: ...


@dataclass
class Query:
    """One search input: the prompt the policy continues, and metadata for scorers/exporters.

    ``metadata`` may hold ``question`` (the user turn, used by exporters), ``ground_truth``
    and ``task`` (used by verifiers and outcome labels).
    """

    prompt: str
    metadata: dict[str, Any] = field(default_factory=dict)
