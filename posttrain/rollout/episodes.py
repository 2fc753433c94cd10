"""Multi-turn RL episodes: split a rolled-out conversation into what the policy gradient trains on.

Why (seed 000, section 3.2.1): thinking models (Qwen3, DeepSeek-R1 style) rewrite the
context between turns -- the ``<think>`` block of turn 1 is deleted from the prompt of
turn 2. Turn 2's state is therefore not the continuation of turn 1's trajectory: the tokens
turn 1 generated are not in turn 2's input, so no gradient can flow from a turn-2 reward
back through the sequence into turn 1's decisions (no back-propagation through time), and
the conversation is not one MDP trajectory. Standard multi-turn PPO/GRPO, which treats the
concatenated dialogue as one trajectory, would train on contexts the model never sees.

What this module does:

- template rewrites history (not prefix-preserving): each assistant turn t is its own
  episode whose ``prompt_ids`` are exactly the inference-time prompt,
  ``apply_chat_template(messages[:t], add_generation_prompt=True)``, and whose
  ``completion_ids`` are that turn's reply up to and including the end-of-turn token;
- template is prefix-preserving (and the pieces tokenise like the inference prompts): the
  whole conversation is ONE episode, ``prompt_ids`` = the first turn's prompt, the rest in
  ``completion_ids`` with ``loss_mask`` = 1 on assistant tokens, 0 on user/tool tokens.
  Under causal attention each turn's log-probs are the same as in its per-turn episode,
  so the objective is identical and the forward pass is cheaper. ``merge=False`` always splits.

Credit assignment (``credit``), for K assistant turns k = 0..K-1:

- ``"per_turn"``: ``rewards`` has one value per turn and turn k is credited r_k only
  (nothing is propagated between turns);
- ``"final_broadcast"``: the final reward R (a float, or the last element of ``rewards``) is
  credited to every turn, discounted per turn back: r_k = R * gamma^(K-1-k).

A merged episode keeps the per-turn credits in ``turn_rewards`` (``token_rewards()`` spreads
them over the turn's tokens); its scalar ``reward`` is R for ``final_broadcast`` and
sum_k r_k (the return) for ``per_turn``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from posttrain.data.render import IGNORE_INDEX, _history_rewritten, _single, _Turn
from posttrain.data.templates import template_turns, turn_ids
from posttrain.errors import ConfigError, DataError

Credit = Literal["per_turn", "final_broadcast"]


@dataclass
class Episode:
    """One policy-gradient sequence: the prompt, the generated part, and its reward.

    ``loss_mask`` (over ``completion_ids``): None means every completion token is trained;
    set on a merged multi-turn episode, where user/tool tokens sit between assistant turns.
    ``turn_spans`` are ``[start, end)`` offsets into ``completion_ids`` of each assistant
    turn, ``turn_rewards`` its credit (both set on merged episodes only).
    """

    prompt_ids: list[int]
    completion_ids: list[int]
    reward: float
    turn_index: int  # message index of the (first) assistant turn
    where: str = ""
    loss_mask: list[int] | None = None
    turn_spans: list[tuple[int, int]] = field(default_factory=list)
    turn_rewards: list[float] = field(default_factory=list)

    def token_rewards(self) -> list[float]:
        """Per completion token: its turn's credit (``reward`` everywhere when not merged), 0 if masked."""
        if not self.turn_spans:
            return [self.reward] * len(self.completion_ids)
        out = [0.0] * len(self.completion_ids)
        for (start, end), r in zip(self.turn_spans, self.turn_rewards, strict=True):
            out[start:end] = [r] * (end - start)
        return out


def turn_credits(
    rewards: Sequence[float] | float, n_turns: int, credit: Credit, gamma: float = 1.0
) -> list[float]:
    """The credit of each of ``n_turns`` assistant turns (see the module docstring).

    per_turn: ``rewards`` as given (a float only for one turn). final_broadcast:
    R * gamma^(n-1-k) with R = ``rewards`` or ``rewards[-1]`` (a list must have one value or
    one per turn).
    """
    if credit not in ("per_turn", "final_broadcast"):
        raise ConfigError(f"credit must be per_turn or final_broadcast, got {credit!r}", where="credit")
    if not 0.0 < gamma <= 1.0:
        raise ConfigError(f"gamma must be in (0, 1], got {gamma}", where="gamma")
    values = [float(rewards)] if isinstance(rewards, int | float) else [float(r) for r in rewards]
    if credit == "per_turn":
        if len(values) != n_turns:
            raise DataError(
                f"per_turn credit needs one reward per assistant turn: {n_turns} turn(s), {len(values)} reward(s)",
                fix="pass a list with one reward per assistant turn, or use credit='final_broadcast'",
            )
        return values
    if len(values) not in (1, n_turns):
        raise DataError(
            f"final_broadcast takes the final reward (or one per turn): {n_turns} turn(s), {len(values)} reward(s)",
            fix="pass the final reward as a float",
        )
    return [values[-1] * gamma ** (n_turns - 1 - k) for k in range(n_turns)]


def _spans(mask: list[int]) -> list[tuple[int, int]]:
    """``[start, end)`` of each run of ones."""
    spans: list[tuple[int, int]] = []
    for i, m in enumerate(mask):
        if m and (not spans or spans[-1][1] != i):
            spans.append((i, i + 1))
        elif m:
            spans[-1] = (spans[-1][0], i + 1)
    return spans


def _merged(
    tokenizer: Any, turns: list[_Turn], credits: list[float], credit: Credit, where: str
) -> Episode | None:
    """One episode for a prefix-preserving conversation; None when it must be split."""
    if any(turn.needs_eos for turn in turns[:-1]) or _history_rewritten(turns):
        return None
    sample = _single(tokenizer, turns, False, where)  # None if pieces tokenise unlike inference
    if sample is None:
        return None
    start = next(i for i, lab in enumerate(sample.labels) if lab != IGNORE_INDEX)
    mask = [int(lab != IGNORE_INDEX) for lab in sample.labels[start:]]
    spans = _spans(mask)
    if len(spans) != len(turns):  # two turns' tokens touch: cannot tell them apart
        return None
    reward = credits[-1] if credit == "final_broadcast" else sum(credits)
    return Episode(
        prompt_ids=sample.input_ids[:start],
        completion_ids=sample.input_ids[start:],
        reward=reward,
        turn_index=turns[0].index,
        where=where,
        loss_mask=mask,
        turn_spans=spans,
        turn_rewards=list(credits),
    )


def split_episodes(
    tokenizer: Any,
    messages: list[dict],
    rewards: Sequence[float] | float,
    credit: Credit = "per_turn",
    *,
    gamma: float = 1.0,
    merge: bool = True,
    where: str = "",
    tools: list[dict] | None = None,
    template_kwargs: Mapping[str, Any] | None = None,
) -> list[Episode]:
    """Episodes for a conversation's assistant turns (algorithm and credit: module docstring).

    Raises DataError for conversations the template rejects, an unclosed ``<think>``
    (drop or re-generate truncated turns first) or a reward list of the wrong length.
    """
    turns = template_turns(tokenizer, messages, where, tools, dict(template_kwargs or {}))
    credits = turn_credits(rewards, len(turns), credit, gamma)
    if merge:
        episode = _merged(tokenizer, turns, credits, credit, where)
        if episode is not None:
            return [episode]
    return [
        Episode(p_ids, c_ids, r, turn.index, f"{where} messages[{turn.index}]".strip())
        for turn, (p_ids, c_ids), r in zip(turns, turn_ids(tokenizer, turns), credits, strict=True)
    ]
