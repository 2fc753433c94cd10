"""Compute accounting for search: what was spent (`Cost`) and what may be spent (`Budget`).

Every strategy charges one `Cost` per prompt (``graph.cost``): prompt tokens, generated
tokens, policy calls the prompt took part in, scorer calls, items and tokens scored, and
an estimated FLOP cost::

    flops = 2 * policy_params * (prompt_tokens + generated_tokens)
          + 2 * scorer_params * scored_tokens

(the usual forward-pass estimate; ``*_params`` are the models' parameter counts, read
by `param_count`: a ``num_parameters`` attribute, else the ``.model``'s size, else 0). Prompt tokens
are counted once per distinct prompt in a call, which is what a prefix-sharing engine
prefills for n samples of one prompt.

A `Budget` is a hard limit per prompt, enforced inside the search, not only reported:
before each policy call `Budget.allowance` gives the most tokens each new sequence may
generate so that no limit is crossed (the call's ``max_new_tokens`` is clamped to the
smallest allowance among the prompts in it, and prompts left with less than
``min(cap // 4, 16)`` tokens per sequence drop out); `Budget.can_score` gates scorer calls. Prompt tokens of a request are known exactly
when the path is continued from token ids, otherwise estimated by the caller.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from posttrain.errors import ConfigError


@dataclass
class Cost:
    """What one search (one prompt) spent."""

    prompt_tokens: int = 0
    generated_tokens: int = 0
    policy_calls: int = 0
    scorer_calls: int = 0
    scored_items: int = 0
    scored_tokens: int = 0
    flops: float = 0.0

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.generated_tokens

    def add(self, other: Cost) -> Cost:
        """A new Cost: the field-wise sum of ``self`` and ``other``."""
        return Cost(**{k: getattr(self, k) + getattr(other, k) for k in asdict(self)})

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "total_tokens": self.total_tokens}

    @classmethod
    def from_dict(cls, d: dict[str, Any] | None) -> Cost:
        d = d or {}
        return cls(**{k: d[k] for k in asdict(cls()) if k in d})


@dataclass
class Budget:
    """Hard limits per prompt; None = unlimited."""

    max_generated_tokens: int | None = None
    """Tokens the policy may generate for one prompt (all samples, steps and rollouts)."""
    max_total_tokens: int | None = None
    """Prompt + generated tokens for one prompt."""
    max_policy_calls: int | None = None
    """Policy calls (expansion rounds) one prompt may take part in."""
    max_scorer_calls: int | None = None
    """Scorer calls one prompt may take part in."""
    max_flops: float | None = None
    """Estimated FLOPs (see the module docstring) for one prompt."""

    def __post_init__(self) -> None:
        for key, value in asdict(self).items():
            if value is not None and value < 0:
                raise ConfigError(f"{key} must be >= 0 or null", where=f"budget.{key}")

    def allowance(
        self, cost: Cost, prompt_tokens: int, n_sequences: int, policy_params: int = 0
    ) -> int | None:
        """Most new tokens each of ``n_sequences`` may generate; None = unlimited, 0 = none.

        ``prompt_tokens`` are what this call will prefill for this prompt.
        """
        if n_sequences < 1:
            return 0
        if self.max_policy_calls is not None and cost.policy_calls >= self.max_policy_calls:
            return 0
        room: list[float] = []
        if self.max_generated_tokens is not None:
            room.append(self.max_generated_tokens - cost.generated_tokens)
        if self.max_total_tokens is not None:
            room.append(self.max_total_tokens - cost.total_tokens - prompt_tokens)
        if self.max_flops is not None and policy_params > 0:
            room.append((self.max_flops - cost.flops) / (2 * policy_params) - prompt_tokens)
        if not room:
            return None
        return max(0, int(min(room) // n_sequences))

    def can_score(self, cost: Cost) -> bool:
        """Whether one more scorer call fits (FLOPs of scoring are checked after the fact)."""
        if self.max_scorer_calls is not None and cost.scorer_calls >= self.max_scorer_calls:
            return False
        return self.max_flops is None or cost.flops < self.max_flops

    def exhausted(self, cost: Cost, policy_params: int = 0) -> bool:
        """Whether no further policy call can generate even one token."""
        return self.allowance(cost, 0, 1, policy_params) == 0


def remaining(budget: Budget, spent: Cost) -> Budget:
    """What is left of ``budget`` once ``spent`` is spent: each limit minus its spending,
    floored at 0 (None stays unlimited)."""
    used = {
        "max_generated_tokens": spent.generated_tokens,
        "max_total_tokens": spent.total_tokens,
        "max_policy_calls": spent.policy_calls,
        "max_scorer_calls": spent.scorer_calls,
        "max_flops": spent.flops,
    }
    left = {k: None if v is None else max(v - used[k], 0) for k, v in asdict(budget).items()}
    return Budget(**left)


def tighter(*budgets: Budget) -> Budget:
    """The field-wise minimum of ``budgets`` (None = unlimited): every one of them holds."""
    out: dict[str, Any] = asdict(Budget())
    for b in budgets:
        for k, v in asdict(b).items():
            if v is not None:
                out[k] = v if out[k] is None else min(out[k], v)
    return Budget(**out)


def charge_generation(cost: Cost, prompt_tokens: int, generated_tokens: int, policy_params: int) -> None:
    """Add one policy call's share to ``cost`` (in place)."""
    cost.policy_calls += 1
    cost.prompt_tokens += prompt_tokens
    cost.generated_tokens += generated_tokens
    cost.flops += 2.0 * policy_params * (prompt_tokens + generated_tokens)


def charge_scoring(cost: Cost, items: int, tokens: int, scorer_params: int) -> None:
    """Add one scorer call's share to ``cost`` (in place)."""
    cost.scorer_calls += 1
    cost.scored_items += items
    cost.scored_tokens += tokens
    cost.flops += 2.0 * scorer_params * tokens


def total_cost(costs: list[Cost]) -> Cost:
    """The sum of several prompts' costs (policy_calls then counts participations, not calls)."""
    out = Cost()
    for c in costs:
        out = out.add(c)
    return out


def param_count(model_like: Any) -> int:
    """Parameters of a policy or scorer, for FLOP estimates: its ``num_parameters`` (an int or
    a method, as on HF models), else the sum over its ``.model``'s parameters, else 0."""
    n = getattr(model_like, "num_parameters", None)
    if callable(n):
        n = n()
    if isinstance(n, int):
        return n
    model = getattr(model_like, "model", None)
    if model is not None and hasattr(model, "parameters"):
        return int(sum(p.numel() for p in model.parameters()))
    return 0
