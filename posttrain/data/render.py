"""Render records into token ids and loss masks with the model's own chat template.

Everything is derived by rendering with ``tokenizer.apply_chat_template``; no
per-model-family string rules. For the assistant turn at index t::

    prompt_t = render(messages[:t], add_generation_prompt=True)   # what inference feeds the model
    full_t   = render(messages[:t + 1])                            # must start with prompt_t
    completion_t = full_t[len(prompt_t):]

The trained part of ``completion_t`` ends with the template's end-of-turn marker
(found once per tokenizer by rendering a probe conversation, e.g. ``<|im_end|>``):
the marker is trained (a model that never learns to stop is a classic bug),
whatever follows it (the ``\\n`` after ``<|im_end|>``) is not. If the template
emits no end-of-turn token, ``eos_token`` is appended to the completion.

Two modes per conversation:

- prefix-preserving (every ``prompt_{t+1}`` starts with ``full_t``, and the
  pieces tokenise to the same ids as each inference prompt): ONE sample, every
  assistant span trained;
- otherwise (e.g. Qwen3-style templates that strip earlier ``<think>`` blocks):
  one sample per assistant turn, ``prompt_t`` tokens + trained ``completion_t``
  tokens, loss on that turn only.

Prompt and completion text are tokenised separately (``add_special_tokens=False``)
and concatenated, so the prompt ids equal ``apply_chat_template(...,
add_generation_prompt=True, tokenize=True)`` exactly. Text after the last
trained end-of-turn marker is dropped from the sample.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from posttrain.errors import ConfigError, DataError

log = logging.getLogger(__name__)

IGNORE_INDEX = -100
TrainOn = Literal["assistant", "all", "last"]
_PROBE = [{"role": "user", "content": "PROBE_USER"}, {"role": "assistant", "content": "PROBE_REPLY"}]
_EOT_CACHE: dict[tuple, str | None] = {}


@dataclass
class Sample:
    """One training sequence: ``labels[i] == input_ids[i]`` where trained, ``-100`` elsewhere."""

    input_ids: list[int]
    labels: list[int]
    where: str = ""
    n_trunc: int = 0  # tokens cut off by `truncate`

    @property
    def n_trained(self) -> int:
        return sum(label != IGNORE_INDEX for label in self.labels)


@dataclass
class _Turn:
    index: int
    prompt: str  # render(messages[:t], add_generation_prompt=True)
    full: str  # render(messages[:t + 1])
    trained: str  # completion up to and including the end-of-turn marker
    needs_eos: bool  # the template emitted no end-of-turn marker


def special_ids(tokenizer: Any) -> set[int]:
    """Ids of special tokens: the special-token map plus added tokens flagged special."""
    ids = set(tokenizer.all_special_ids)
    ids.update(i for i, tok in tokenizer.added_tokens_decoder.items() if tok.special)
    return ids


def end_of_turn(tokenizer: Any) -> str | None:
    """The text that closes an assistant turn, up to and including its first special token.

    Found by rendering ``[user, assistant]`` with sentinel contents and reading what
    follows the reply (``"<|im_end|>\\n"`` -> ``"<|im_end|>"``; Llama-2's
    ``" </s>"`` stays whole). None if the template closes turns without a special token.
    """
    key = (str(tokenizer.chat_template), tokenizer.eos_token, tuple(sorted(special_ids(tokenizer))))
    if key not in _EOT_CACHE:
        _EOT_CACHE[key] = _probe_end_of_turn(tokenizer)
    return _EOT_CACHE[key]


def _probe_end_of_turn(tokenizer: Any) -> str | None:
    try:
        text = tokenizer.apply_chat_template(_PROBE, tokenize=False)
    except Exception:  # a template may reject the probe; fall back to eos
        return tokenizer.eos_token
    cut = text.rfind("PROBE_REPLY")
    if cut < 0:
        return tokenizer.eos_token
    suffix = text[cut + len("PROBE_REPLY") :]
    specials = special_ids(tokenizer)
    for tok_id in _encode(tokenizer, suffix):
        if tok_id in specials:
            token = tokenizer.convert_ids_to_tokens(tok_id)
            end = suffix.find(token)
            return suffix[: end + len(token)] if end >= 0 else token
    return None


def _encode(tokenizer: Any, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"] if text else []


def _require_template(tokenizer: Any, where: str) -> None:
    if not getattr(tokenizer, "chat_template", None):
        raise DataError(
            "the tokenizer has no chat template, so chat data cannot be rendered",
            where=where or None,
            fix="use an instruct model's tokenizer, set tokenizer.chat_template, "
            "or store the data as prompt/completion plain strings",
        )


def _render(tokenizer: Any, messages: list[dict], gen: bool, where: str, **kwargs: Any) -> str:
    try:
        return tokenizer.apply_chat_template(messages, add_generation_prompt=gen, tokenize=False, **kwargs)
    except Exception as e:  # jinja raises TemplateError, templates call raise_exception
        raise DataError(
            f"the chat template rejected this conversation: {e}",
            where=where or None,
            fix="check the message roles and order the template expects",
        ) from None


def _render_turn(
    tokenizer: Any, messages: list[dict], t: int, eot: str | None, where: str, **kw: Any
) -> _Turn:
    if t == 0:
        raise DataError(
            "messages[0] is an assistant turn; there is no prompt to condition it on",
            where=where or None,
            fix="start the conversation with a system or user message, or drop the row",
        )
    prompt = _render(tokenizer, messages[:t], True, where, **kw)
    full = _render(tokenizer, messages[: t + 1], False, where, **kw)
    if not full.startswith(prompt):
        at = next((i for i, (a, b) in enumerate(zip(prompt, full, strict=False)) if a != b), len(full))
        raise DataError(
            f"rendering messages[:{t + 1}] does not start with the generation prompt for messages[{t}]: "
            f"the prompt continues {prompt[at : at + 40]!r} but the rendered turn has {full[at : at + 40]!r}",
            where=where or None,
            fix="check the template options (e.g. enable_thinking=False pre-fills an empty <think> block, "
            "which contradicts reasoning_content in the data), or drop the row",
        )
    completion = full[len(prompt) :]
    cut = completion.rfind(eot) if eot else -1
    trained = completion[: cut + len(eot)] if cut >= 0 else completion
    reply = completion[:cut] if cut >= 0 else completion
    if not reply.strip():
        raise DataError(
            f"messages[{t}]: the template renders an empty assistant reply",
            where=where or None,
            fix="drop the row or fill in the assistant reply",
        )
    return _Turn(t, prompt, full, trained, needs_eos=cut < 0)


def _encode_many(tokenizer: Any, texts: list[str]) -> list[list[int]]:
    """Tokenise several texts in one (Rust-parallel) call, each separately."""
    return tokenizer(texts, add_special_tokens=False)["input_ids"] if texts else []


def _join_pieces(encoded: list[list[int]], trained: list[bool]) -> tuple[list[int], list[int], list[int]]:
    """Concatenate tokenised pieces; return ids, labels and each piece's start."""
    ids: list[int] = []
    labels: list[int] = []
    starts: list[int] = []
    for piece, train in zip(encoded, trained, strict=True):
        starts.append(len(ids))
        ids += piece
        labels += piece if train else [IGNORE_INDEX] * len(piece)
    return ids, labels, starts


def _to_sample(tokenizer: Any, ids: list[int], labels: list[int], where: str, add_eos: bool) -> Sample:
    """A sample, with ``eos_token`` appended (and trained) when the template closed no turn."""
    if add_eos:
        if tokenizer.eos_token_id is None:
            raise DataError(
                "the template does not close assistant turns and the tokenizer has no eos_token",
                where=where or None,
                fix="set tokenizer.eos_token so the model can learn to stop",
            )
        ids, labels = ids + [tokenizer.eos_token_id], labels + [tokenizer.eos_token_id]
    return Sample(ids, labels, where)


def _per_turn(tokenizer: Any, turn: _Turn, where: str) -> Sample:
    ids, labels, _ = _join_pieces(_encode_many(tokenizer, [turn.prompt, turn.trained]), [False, True])
    return _to_sample(tokenizer, ids, labels, f"{where} messages[{turn.index}]", turn.needs_eos)


def _history_rewritten(turns: list[_Turn]) -> bool:
    return any(not b.prompt.startswith(a.full) for a, b in zip(turns, turns[1:], strict=False))


def is_prefix_preserving(tokenizer: Any, messages: list[dict], **template_kwargs: Any) -> bool:
    """True if the template never rewrites history for this conversation.

    That is, for consecutive assistant turns t < u, ``render(messages[:u],
    add_generation_prompt=True)`` starts with ``render(messages[:t + 1])``.
    Text-level check; `render_chat` additionally compares token ids.
    """
    _require_template(tokenizer, "")
    targets = [i for i, m in enumerate(messages) if m.get("role") == "assistant" and i > 0]
    eot = end_of_turn(tokenizer)
    turns = [_render_turn(tokenizer, messages, t, eot, "", **template_kwargs) for t in targets]
    return not _history_rewritten(turns)


def _single(tokenizer: Any, turns: list[_Turn], train_all: bool, where: str) -> Sample | None:
    """One sample with every turn trained; None if a prompt's ids differ from inference's."""
    pieces: list[tuple[str, bool]] = []
    consumed = 0  # characters of the conversation text already in `pieces`
    for turn in turns:
        pieces += [(turn.prompt[consumed:], train_all), (turn.trained, True)]
        consumed = len(turn.prompt) + len(turn.trained)
    # Separate tokenisation could merge differently at a piece boundary than the
    # inference-time prompt does; compare each later turn's prompt ids too.
    encoded = _encode_many(tokenizer, [text for text, _ in pieces] + [t.prompt for t in turns[1:]])
    ids, labels, starts = _join_pieces(encoded[: len(pieces)], [train for _, train in pieces])
    for i, prompt_ids in enumerate(encoded[len(pieces) :], start=1):
        if ids[: starts[2 * i + 1]] != prompt_ids:  # prompt of turn i = pieces before its completion
            return None
    return _to_sample(tokenizer, ids, labels, where, turns[-1].needs_eos)


def _render_chat(
    tokenizer: Any,
    messages: list[dict],
    *,
    train_on: TrainOn,
    where: str,
    first: int = 0,
    **kw: Any,
) -> tuple[list[Sample], str]:
    """Samples for the assistant turns at index >= ``first``, and the mode used (for logging)."""
    if train_on not in ("assistant", "all", "last"):
        raise ConfigError(f"train_on must be assistant, all or last, got {train_on!r}")
    _require_template(tokenizer, where)
    targets = [i for i, m in enumerate(messages) if m.get("role") == "assistant" and i >= first]
    if not targets:
        raise DataError(
            "no assistant turn to train on",
            where=where or None,
            fix="add the assistant reply, or drop the row",
        )
    eot = end_of_turn(tokenizer)
    if train_on == "last":
        return [
            _per_turn(tokenizer, _render_turn(tokenizer, messages, targets[-1], eot, where, **kw), where)
        ], "last"
    turns = [_render_turn(tokenizer, messages, t, eot, where, **kw) for t in targets]
    if any(turn.needs_eos for turn in turns[:-1]):
        reason = "the template closes turns without a special token (eos is appended per turn)"
    elif _history_rewritten(turns):
        reason = "the template rewrites earlier turns (e.g. strips <think>)"
    else:
        sample = _single(tokenizer, turns, train_on == "all", where)
        if sample is not None:
            return [sample], "prefix-preserving"
        reason = "separately tokenised pieces differ from the inference prompt ids"
    if train_on == "all":
        raise DataError(
            f"train_on='all' needs a prefix-preserving rendering, but {reason}",
            where=where or None,
            fix="use train_on='assistant' (one sample per assistant turn) for this template",
        )
    return [_per_turn(tokenizer, turn, where) for turn in turns], f"per-turn: {reason}"


def render_chat(
    tokenizer: Any,
    messages: list[dict],
    *,
    train_on: TrainOn = "assistant",
    where: str = "",
    tools: list[dict] | None = None,
    template_kwargs: Mapping[str, Any] | None = None,
) -> list[Sample]:
    """Render a chat into training samples (see the module docstring for the algorithm).

    ``train_on``: ``"assistant"`` trains every assistant turn; ``"all"`` trains every
    token (prefix-preserving conversations only); ``"last"`` trains only the final
    assistant turn. ``tools`` and ``template_kwargs`` are passed to the template.
    """
    kw = {**(template_kwargs or {}), **({"tools": tools} if tools else {})}
    samples, mode = _render_chat(tokenizer, messages, train_on=train_on, where=where, **kw)
    log.debug("%s: %s -> %d sample(s)", where, mode, len(samples))
    return samples


def _plain(value: str | list[dict], role: str, field: str, where: str) -> str:
    if isinstance(value, str):
        return value
    if len(value) == 1 and value[0].get("role") == role:
        return value[0].get("content", "")
    raise DataError(
        f"{field}: a list of messages needs a chat template, and the tokenizer has none",
        where=where or None,
        fix="use plain strings for prompt and completion, or a tokenizer with a chat template",
    )


def render_prompt_completion(
    tokenizer: Any,
    prompt: str | list[dict],
    completion: str | list[dict],
    where: str = "",
    template_kwargs: Mapping[str, Any] | None = None,
) -> Sample:
    """One sample: the prompt (untrained) followed by the completion (trained).

    With a chat template, the prompt messages are rendered with
    ``add_generation_prompt=True`` and the completion as the assistant turn(s)
    (a string becomes a user / assistant message). Without one, plain strings are
    concatenated: ``encode(prompt, add_special_tokens=True) + encode(completion)
    + [eos]`` (eos trained, and not doubled when the completion already ends with it).
    """
    if not getattr(tokenizer, "chat_template", None):
        p_ids = tokenizer(_plain(prompt, "user", "prompt", where), add_special_tokens=True)["input_ids"]
        c_ids = _encode(tokenizer, _plain(completion, "assistant", "completion", where))
        if not c_ids:
            raise DataError("completion: empty", where=where or None, fix="drop the row or fill it")
        if tokenizer.eos_token_id is None:
            raise DataError(
                "the tokenizer has no eos_token", where=where or None, fix="set tokenizer.eos_token"
            )
        if c_ids[-1] != tokenizer.eos_token_id:
            c_ids.append(tokenizer.eos_token_id)
        return Sample(p_ids + c_ids, [IGNORE_INDEX] * len(p_ids) + c_ids, where)
    p_msgs = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)
    c_msgs = (
        [{"role": "assistant", "content": completion}] if isinstance(completion, str) else list(completion)
    )
    samples, mode = _render_chat(
        tokenizer,
        p_msgs + c_msgs,
        train_on="assistant",
        where=where,
        first=len(p_msgs),
        **(template_kwargs or {}),
    )
    if len(samples) != 1:
        raise DataError(
            f"the completion holds several assistant turns and {mode.removeprefix('per-turn: ')}",
            where=where or None,
            fix="store this row as a chat record (one sample per assistant turn)",
        )
    return samples[0]


def render_records(
    tokenizer: Any,
    records: Sequence[Any],
    *,
    train_on: TrainOn = "assistant",
    template_kwargs: Mapping[str, Any] | None = None,
) -> list[Sample]:
    """Render chat / prompt_completion `Record`s; logs once which mode was used and why."""
    samples: list[Sample] = []
    modes: Counter[str] = Counter()
    for rec in records:
        if rec.kind == "chat":
            kw = {
                **(template_kwargs or {}),
                **({"tools": rec.data["tools"]} if rec.data.get("tools") else {}),
            }
            out, mode = _render_chat(
                tokenizer, rec.data["messages"], train_on=train_on, where=rec.where, **kw
            )
        elif rec.kind == "prompt_completion":
            out = [
                render_prompt_completion(
                    tokenizer, rec.data["prompt"], rec.data["completion"], rec.where, template_kwargs
                )
            ]
            mode = "prompt/completion"
        else:
            raise DataError(
                f"{rec.kind} records cannot be rendered for SFT",
                where=rec.where,
                fix="use chat or prompt_completion records for SFT",
            )
        samples += out
        modes[mode] += 1
    for mode, n in sorted(modes.items()):
        log.info("chat rendering: %d record(s) %s", n, _mode_text(mode))
    return samples


def _mode_text(mode: str) -> str:
    if mode.startswith("per-turn: "):
        reason = mode.removeprefix("per-turn: ")
        return f"not prefix-preserving ({reason}) -> one sample per assistant turn, loss on that turn only"
    return _MODE_TEXT.get(mode, mode)


_MODE_TEXT = {
    "prefix-preserving": "prefix-preserving -> one sample each, every assistant turn trained",
    "last": "train_on=last -> one sample each, final assistant turn trained",
    "prompt/completion": "prompt/completion -> one sample each, completion trained",
}


def truncate(
    samples: Sequence[Sample], max_len: int, policy: Literal["truncate", "drop"]
) -> tuple[list[Sample], dict]:
    """Apply ``max_len``: ``"truncate"`` cuts the tail (right truncation), ``"drop"`` drops the sample.

    A truncated sample left with no trained token is dropped too (``dropped_no_target``).
    Returns ``(kept, {"truncated", "dropped", "dropped_no_target", "tokens_removed"})``.
    """
    if policy not in ("truncate", "drop"):
        raise ConfigError(f"truncation policy must be 'truncate' or 'drop', got {policy!r}")
    stats = {"truncated": 0, "dropped": 0, "dropped_no_target": 0, "tokens_removed": 0}
    kept: list[Sample] = []
    for s in samples:
        extra = len(s.input_ids) - max_len
        if extra <= 0:
            kept.append(s)
            continue
        stats["tokens_removed"] += extra if policy == "truncate" else len(s.input_ids)
        if policy == "drop":
            stats["dropped"] += 1
            continue
        cut = Sample(s.input_ids[:max_len], s.labels[:max_len], s.where, s.n_trunc + extra)
        if cut.n_trained == 0:
            stats["dropped_no_target"] += 1
            continue
        stats["truncated"] += 1
        kept.append(cut)
    return kept, stats


def _last_trained(labels: list[int]) -> int | None:
    return next((lab for lab in reversed(labels) if lab != IGNORE_INDEX), None)


def summarize(samples: Sequence[Sample], tokenizer: Any, truncation: Mapping[str, int] | None = None) -> dict:
    """Counts for the pre-training summary table.

    ``no_stop``: samples whose last trained token is not a special token (the model
    would not learn to stop on them; expected only for truncated samples).
    """
    specials = special_ids(tokenizer)
    tokens = sum(len(s.input_ids) for s in samples)
    trained = sum(s.n_trained for s in samples)
    lengths = [len(s.input_ids) for s in samples] or [0]
    no_stop = sum(1 for s in samples if _last_trained(s.labels) not in specials)
    stats = {
        "samples": len(samples),
        "tokens": tokens,
        "trained_tokens": trained,
        "masked_fraction": 1.0 - trained / tokens if tokens else 0.0,
        "mean_len": tokens / len(samples) if samples else 0.0,
        "max_len": max(lengths),
        "truncated": sum(1 for s in samples if s.n_trunc > 0),
        "no_stop": no_stop,
    }
    for key in ("dropped", "dropped_no_target"):
        stats[key] = int((truncation or {}).get(key, 0))
    return stats


_LABELS = {  # summarize() key -> row label, in table order
    **{k: k.replace("_", " ") for k in ("samples", "tokens", "trained_tokens", "masked_fraction")},
    **{"mean_len": "mean length", "max_len": "max length", "truncated": "truncated"},
    **{"dropped": "dropped (too long)", "dropped_no_target": "dropped (no target left)"},
    "no_stop": "no trained stop token",
}


def _fmt(key: str, value: Any) -> str:
    if key == "masked_fraction":
        return f"{value:.1%}"
    return f"{value:,.1f}" if isinstance(value, float) else f"{value:,}"


def format_summary_table(stats: Mapping[str, Any]) -> str:
    """A two-column text table of `summarize` output, printed before step 0."""
    rows = [(label, _fmt(key, stats[key])) for key, label in _LABELS.items() if key in stats]
    width = max(len(label) for label, _ in rows)
    vwidth = max(len(text) for _, text in rows)
    lines = ["data summary", "-" * (width + vwidth + 2)]
    lines += [f"{label:<{width}}  {text:>{vwidth}}" for label, text in rows]
    return "\n".join(lines)
