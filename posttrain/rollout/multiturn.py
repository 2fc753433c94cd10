"""Multi-turn rollouts: a conversation environment, n conversations per prompt, and their RL episodes.

One conversation of a prompt record (``n`` of them per record: the GRPO group)::

    messages = record["prompt"]
    for turn k = 0 .. max_turns - 1:
        c_k = engine.generate([messages])       # prompt_k = apply_chat_template(messages, add_generation_prompt=True)
        messages += [{"role": "assistant", "content": c_k.text}]
        r_k, next_message = env.step(record, messages)
        stop if the environment is done, c_k was cut by max_new_tokens, or k = max_turns - 1
        messages += [next_message]

The engine renders each turn's prompt from the message list with the tokenizer's chat
template, so a template that deletes earlier ``<think>`` blocks deletes them at rollout time
too: turn k is sampled from exactly the prompt it will be trained on. Turn 0 samples ``n``
replies of each record in one call; later turns one reply per live conversation.

Environment (`ConversationEnv`): ``step(record, messages) -> EnvStep(reward, message)``
after every assistant turn; ``message`` None = done. Per-turn rewards are every step's
reward; a final reward is the last step's (final_broadcast credit reads only that one).
Built in, on the task suite's integer-answer problems (`register_env` adds others):

- ``followup``: turn 0 solves the task; turn k > 0 asks "Now add a_k to your answer." with
  a_k in 2..9 fixed by (question, k); turn k is right iff its answer is
  ground_truth + a_1 + ... + a_k (the task verifier). Never done before max_turns.
- ``retry``: right -> done (reward 1); wrong -> "That is wrong, try again." (reward 0).

Episodes (`conversation_episodes`): `posttrain.rollout.episodes.split_episodes` decides the
structure and the credits. The policy gradient must see the tokens the policy sampled, not
a re-tokenised rendering (the template re-formats a reply: ``<think>x</think>`` becomes
``<think>\\nx\\n</think>\\n\\n``), so:

- per-turn episode k: ``prompt_ids`` = turn k's inference prompt (the engine's, equal to
  split_episodes' prompt), completion = the sampled ids with the sampler's log-probs;
- a merged episode (prefix-preserving template) is kept only when every assistant span is
  token-for-token the sampled turn and everything before span k is turn k's inference
  prompt; then the old log-probs of span k are the sampler's, user tokens are masked;
- otherwise (a reply the template re-formats, an unclosed ``<think>``, a turn cut by
  max_new_tokens) the conversation is split per turn as above, which is always exact.
"""

from __future__ import annotations

import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

from posttrain.errors import ConfigError, DataError
from posttrain.rollout.engine import Completion, RolloutEngine
from posttrain.rollout.episodes import Credit, Episode, split_episodes, turn_credits
from posttrain.rollout.sampling import SamplingParams

# ---------------------------------------------------------------- environments


@dataclass(frozen=True)
class EnvStep:
    """The environment's answer to one assistant turn."""

    reward: float
    """This turn's reward (the final reward when ``message`` is None)."""
    message: dict | None = None
    """The next user message; None = the conversation is done."""

    @property
    def done(self) -> bool:
        return self.message is None


@runtime_checkable
class ConversationEnv(Protocol):
    """Scores an assistant turn and says what the user says next. Stateless: all it needs is in
    ``record`` (the prompt record, its metadata) and ``messages`` (ending with the reply)."""

    def step(self, record: dict, messages: list[dict]) -> EnvStep: ...


ENVS: dict[str, Callable[[], ConversationEnv]] = {}


def register_env(name: str):
    """Decorator: add an environment factory under ``name`` (``data.multi_turn.env``)."""

    def wrap(factory: Callable[[], ConversationEnv]) -> Callable[[], ConversationEnv]:
        ENVS[name] = factory
        return factory

    return wrap


def get_env(name: str) -> ConversationEnv:
    """A new environment ``name``; an unknown name lists the valid ones."""
    if name not in ENVS:
        raise ConfigError(
            f"unknown conversation environment {name!r}",
            where="data.multi_turn.env",
            fix=f"use one of: {', '.join(sorted(ENVS))} (or add one with register_env)",
        )
    return ENVS[name]()


def _task_truth(record: dict) -> tuple[str, str]:
    meta = record.get("metadata", {})
    task, truth = meta.get("task") or meta.get("scorer"), meta.get("ground_truth")
    if not isinstance(task, str) or truth is None:
        raise DataError(
            "the task environments need metadata.task (or scorer) and metadata.ground_truth",
            where="prompt record",
            fix="use data.prompts: tasks, or write those keys into each prompt record",
        )
    return task, str(truth)


def _replies(messages: list[dict]) -> list[str]:
    return [m.get("content") or "" for m in messages if m.get("role") == "assistant"]


def followup_add(question: str, k: int) -> int:
    """a_k in 2..9, fixed by the question and the turn (so every sample of a group gets the same)."""
    return 2 + zlib.crc32(f"{question}|{k}".encode()) % 8


@register_env("followup")
class FollowupEnv:
    """Turn 0 solves the task; turn k asks to add a_k to the previous answer (module docstring)."""

    def step(self, record: dict, messages: list[dict]) -> EnvStep:
        from posttrain.rewards.verifiers import verify_task

        task, truth = _task_truth(record)
        try:
            value = int(truth)
        except ValueError:
            raise DataError(
                f"followup adds to an integer answer; task {task!r} answers {truth!r}",
                where="data.multi_turn.env",
                fix="use integer-answer tasks (arith, arith_hard) or env: retry",
            ) from None
        question = next((m["content"] for m in messages if m.get("role") == "user"), "")
        k = len(_replies(messages)) - 1
        want = value + sum(followup_add(question, j) for j in range(1, k + 1))
        ok = verify_task(_replies(messages)[-1], task, str(want))
        nxt = {"role": "user", "content": f"Now add {followup_add(question, k + 1)} to your answer."}
        return EnvStep(float(ok), nxt)


@register_env("retry")
class RetryEnv:
    """Done with reward 1 when the task verifier accepts the reply, else reward 0 and a retry request."""

    def step(self, record: dict, messages: list[dict]) -> EnvStep:
        from posttrain.rewards.verifiers import verify_task

        task, truth = _task_truth(record)
        if verify_task(_replies(messages)[-1], task, truth):
            return EnvStep(1.0)
        return EnvStep(0.0, {"role": "user", "content": "That is wrong, try again."})


# ---------------------------------------------------------------- rollout


@dataclass
class Conversation:
    """One sampled conversation: its messages, the engine's output per turn, the environment's rewards."""

    record: dict
    messages: list[dict]
    """The prompt messages, then every assistant reply and the user messages between them."""
    turns: list[Completion] = field(default_factory=list)
    """Per assistant turn: ``prompt_ids`` = that turn's inference prompt, the sampled ids and log-probs."""
    rewards: list[float] = field(default_factory=list)
    done: bool = False
    """The environment ended it (rather than max_turns or a cut-off reply)."""


def _messages(record: dict) -> list[dict]:
    prompt = record.get("prompt")
    if isinstance(prompt, str):
        return [{"role": "user", "content": prompt}]
    if isinstance(prompt, list) and prompt and all(isinstance(m, dict) for m in prompt):
        return [dict(m) for m in prompt]
    raise DataError(
        "a multi-turn prompt must be a string or a list of chat messages",
        where=f"prompt {str(prompt)[:80]!r}",
    )


def rollout_conversations(
    engine: RolloutEngine,
    records: Sequence[dict],
    env: ConversationEnv,
    params: SamplingParams,
    max_turns: int,
    seed_of: Callable[[int], int] | None = None,
) -> list[Conversation]:
    """``params.n`` conversations per record, ordered by (record, sample); turn k sampled with
    seed ``seed_of(k)`` (else ``params.seed``)."""
    if max_turns < 1:
        raise ConfigError("max_turns must be >= 1", where="data.multi_turn.max_turns")
    convs = [Conversation(r, _messages(r)) for r in records for _ in range(params.n)]
    live = list(range(len(convs)))
    for turn in range(max_turns):
        if not live:
            break
        seed = seed_of(turn) if seed_of is not None else params.seed
        if turn == 0:
            out = engine.generate([c.messages for c in convs[:: params.n]], params.replace(seed=seed))
        else:
            out = engine.generate([convs[i].messages for i in live], params.replace(n=1, seed=seed))
        still = []
        for i, c in zip(live, out, strict=True):
            conv = convs[i]
            conv.turns.append(c)
            conv.messages.append({"role": "assistant", "content": c.text})
            step = env.step(conv.record, conv.messages)
            conv.rewards.append(float(step.reward))
            conv.done = step.done
            if not step.done and c.finish_reason != "length" and turn + 1 < max_turns:
                conv.messages.append(dict(step.message))
                still.append(i)
        live = still
    return convs


def conversation_return(rewards: Sequence[float], credit: Credit) -> float:
    """The conversation's return: the final reward (final_broadcast) or the sum of turn rewards (per_turn)."""
    return float(rewards[-1]) if credit == "final_broadcast" else float(sum(rewards))


# ---------------------------------------------------------------- episodes


@dataclass
class EpisodeRow(Completion):
    """An episode as a trainer row: a `Completion` whose ``token_ids`` are the trained part.

    ``loss_mask`` (merged episodes): 1 on sampled assistant tokens, 0 on user tokens between
    turns (no log-prob: ``logprobs`` is 0 there). ``spans``: ``(turn k, start, end)`` offsets
    into ``token_ids`` of each assistant turn; ``reward``: the episode's credit
    (`posttrain.rollout.episodes`); ``conversation``: the conversation's index in its batch.
    """

    loss_mask: list[int] | None = None
    spans: list[tuple[int, int, int]] = field(default_factory=list)
    reward: float = 0.0
    conversation: int = 0


def _turn_row(turn: Completion, k: int, credit: float, conversation: int) -> EpisodeRow:
    n = len(turn.token_ids)
    return EpisodeRow(
        turn.prompt_index, turn.sample_index, list(turn.prompt_ids), list(turn.token_ids), turn.text,
        list(turn.logprobs), turn.finish_reason, spans=[(k, 0, n)], reward=credit, conversation=conversation,
    )  # fmt: skip


def _merged_row(ep: Episode, turns: list[Completion], conversation: int) -> EpisodeRow | None:
    """The merged episode with the sampled log-probs; None unless its spans are the sampled turns."""
    seq = ep.prompt_ids + ep.completion_ids
    start = len(ep.prompt_ids)
    logprobs = [0.0] * len(ep.completion_ids)
    for turn, (a, b) in zip(turns, ep.turn_spans, strict=True):
        if seq[start + a : start + b] != turn.token_ids or seq[: start + a] != turn.prompt_ids:
            return None
        logprobs[a:b] = turn.logprobs
    last = turns[-1]
    return EpisodeRow(
        last.prompt_index, last.sample_index, list(ep.prompt_ids), list(ep.completion_ids), last.text,
        logprobs, last.finish_reason, loss_mask=list(ep.loss_mask), reward=ep.reward, conversation=conversation,
        spans=[(k, a, b) for k, (a, b) in enumerate(ep.turn_spans)],
    )  # fmt: skip


def conversation_episodes(
    tokenizer: Any,
    conv: Conversation,
    credit: Credit,
    gamma: float = 1.0,
    *,
    merge: bool = True,
    conversation: int = 0,
) -> list[EpisodeRow]:
    """The trainer rows of one conversation (module docstring): one merged row or one per turn."""
    credits = turn_credits(conv.rewards, len(conv.turns), credit, gamma)
    try:
        episodes = split_episodes(tokenizer, conv.messages, conv.rewards, credit, gamma=gamma, merge=merge)
    except DataError:  # e.g. a reply opened <think> and never closed it: the per-turn split is exact
        episodes = []
    if merge and len(episodes) == 1 and episodes[0].loss_mask is not None and len(conv.turns) > 1:
        row = _merged_row(episodes[0], conv.turns, conversation)
        if row is not None:
            return [row]
    return [_turn_row(t, k, credits[k], conversation) for k, t in enumerate(conv.turns)]
