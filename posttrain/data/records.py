"""Record kinds and their validation.

A record is one JSON object. Five kinds, told apart by their keys:

- ``chat``:              ``{"messages": [{"role", "content", "reasoning_content"?, "tool_calls"?}, ...]}``
- ``prompt_completion``: ``{"prompt": str | [messages], "completion": str | [messages]}``
- ``preference``:        ``{"prompt": str | [messages], "chosen": ..., "rejected": ...}``
- ``ranking``:           ``{"prompt": ..., "responses": [str | [messages], ...], "ranking": [int, ...]}``
  (``ranking`` lists response indices best-first and is a permutation)
- ``prompt``:            ``{"prompt": str | [messages], "metadata"?: {"scorer"?: str, "ground_truth"?: ...}}``

`validate_record` returns a normalised copy: a string prompt becomes
``[{"role": "user", "content": s}]``, a string response becomes
``[{"role": "assistant", "content": s}]``, and optional message fields that are
``None`` (Arrow/Parquet fill missing struct fields with nulls) are dropped.
Every problem raises `DataError` naming the record (``where``), the field path
(``messages[2].content``) and what was expected.
"""

from __future__ import annotations

from typing import Any

from posttrain.errors import DataError

KINDS = ("chat", "prompt_completion", "preference", "ranking", "prompt")
ROLES = ("system", "user", "assistant", "tool")
_OPTIONAL_STR_FIELDS = ("reasoning_content", "name", "tool_call_id")


def detect_kind(row: dict, where: str = "") -> str:
    """Return the kind of ``row`` from its keys (see the module docstring)."""
    if not isinstance(row, dict):
        raise DataError(
            f"expected a JSON object (a record), got {type(row).__name__}",
            where=where or None,
            fix="write one JSON object per record",
        )
    keys = set(row)
    if "messages" in keys:
        return "chat"
    if {"chosen", "rejected"} <= keys:
        return "preference"
    if {"responses", "ranking"} <= keys:
        return "ranking"
    if "prompt" in keys and "completion" in keys:
        return "prompt_completion"
    if "prompt" in keys:
        return "prompt"
    raise DataError(
        f"cannot tell the record kind from its keys {sorted(keys)}",
        where=where or None,
        fix="use one of: messages (chat); prompt+completion; prompt+chosen+rejected (preference); "
        "prompt+responses+ranking (ranking); prompt (+metadata) for RL prompts",
    )


def validate_record(row: dict, kind: str, where: str) -> dict:
    """Check ``row`` against ``kind`` and return the normalised record (a new dict)."""
    if kind not in KINDS:
        raise DataError(f"unknown record kind {kind!r}", where=where, fix=f"use one of {', '.join(KINDS)}")
    if not isinstance(row, dict):
        raise DataError(f"expected a JSON object, got {type(row).__name__}", where=where)
    return _VALIDATORS[kind](row, where)


def _fail(where: str, field: str, message: str, fix: str | None = None) -> DataError:
    return DataError(f"{field}: {message}", where=where, fix=fix)


def _type_name(value: Any) -> str:
    return "null" if value is None else type(value).__name__


def _require(row: dict, field: str, where: str) -> Any:
    if field not in row or row[field] is None:
        raise _fail(where, field, "missing required field", fix=f"add a {field!r} field to every record")
    return row[field]


def _message(msg: Any, field: str, where: str) -> dict:
    """Validate one message and return it without null optional fields."""
    if not isinstance(msg, dict):
        raise _fail(where, field, f"expected an object with role and content, got {_type_name(msg)}")
    role = msg.get("role")
    if role not in ROLES:
        raise _fail(where, f"{field}.role", f"expected one of {', '.join(ROLES)}, got {role!r}")
    out = {k: v for k, v in msg.items() if v is not None}
    has_tool_calls = bool(out.get("tool_calls"))
    if "content" not in out and role != "assistant":
        raise _fail(
            where,
            f"{field}.content",
            "missing required field",
            fix=f"give every {role} message a content string",
        )
    content = out.get("content", "")
    if not isinstance(content, str):
        raise _fail(where, f"{field}.content", f"expected a string, got {_type_name(content)}")
    out["content"] = content
    for key in _OPTIONAL_STR_FIELDS:
        if key in out and not isinstance(out[key], str):
            raise _fail(where, f"{field}.{key}", f"expected a string, got {_type_name(out[key])}")
    if "tool_calls" in out and not isinstance(out["tool_calls"], list):
        raise _fail(where, f"{field}.tool_calls", f"expected a list, got {_type_name(out['tool_calls'])}")
    if (
        role == "assistant"
        and not content.strip()
        and not out.get("reasoning_content")
        and not has_tool_calls
    ):
        raise _fail(
            where,
            f"{field}.content",
            "empty assistant turn (no content, reasoning_content or tool_calls)",
            fix="drop the row or fill in the assistant reply",
        )
    return out


def _messages(value: Any, field: str, where: str) -> list[dict]:
    if not isinstance(value, list) or not value:
        raise _fail(
            where, field, f"expected a non-empty list of {{role, content}} objects, got {_type_name(value)}"
        )
    return [_message(m, f"{field}[{i}]", where) for i, m in enumerate(value)]


def _as_messages(value: Any, field: str, where: str, role: str) -> list[dict]:
    """A string becomes one message with ``role``; a list is validated as messages."""
    if isinstance(value, str):
        if role == "assistant" and not value.strip():
            raise _fail(where, field, "empty response", fix="drop the row or fill in the response")
        return [{"role": role, "content": value}]
    if isinstance(value, list):
        return _messages(value, field, where)
    raise _fail(where, field, f"expected a string or a list of messages, got {_type_name(value)}")


def _response(value: Any, field: str, where: str) -> list[dict]:
    messages = _as_messages(value, field, where, "assistant")
    if not any(m["role"] == "assistant" for m in messages):
        raise _fail(where, field, "a response needs at least one assistant message")
    return messages


def _chat(row: dict, where: str) -> dict:
    messages = _messages(_require(row, "messages", where), "messages", where)
    if not any(m["role"] == "assistant" for m in messages):
        raise _fail(
            where,
            "messages",
            "no assistant turn, so there is nothing to train on",
            fix="add the assistant reply, or store the row as a prompt record for RL",
        )
    return {**row, "messages": messages}


def _prompt_completion(row: dict, where: str) -> dict:
    prompt = _as_messages(_require(row, "prompt", where), "prompt", where, "user")
    completion = _response(_require(row, "completion", where), "completion", where)
    return {**row, "prompt": prompt, "completion": completion}


def _preference(row: dict, where: str) -> dict:
    prompt = _as_messages(_require(row, "prompt", where), "prompt", where, "user")
    chosen = _response(_require(row, "chosen", where), "chosen", where)
    rejected = _response(_require(row, "rejected", where), "rejected", where)
    return {**row, "prompt": prompt, "chosen": chosen, "rejected": rejected}


def _ranking(row: dict, where: str) -> dict:
    prompt = _as_messages(_require(row, "prompt", where), "prompt", where, "user")
    responses = _require(row, "responses", where)
    if not isinstance(responses, list) or len(responses) < 2:
        raise _fail(
            where, "responses", f"expected a list of at least 2 responses, got {_type_name(responses)}"
        )
    normalised = [_response(r, f"responses[{i}]", where) for i, r in enumerate(responses)]
    ranking = _require(row, "ranking", where)
    n = len(responses)
    if (
        not isinstance(ranking, list)
        or not all(isinstance(i, int) and not isinstance(i, bool) for i in ranking)
        or sorted(ranking) != list(range(n))
    ):
        raise _fail(
            where,
            "ranking",
            f"expected a permutation of 0..{n - 1} (response indices, best first), got {ranking!r}",
        )
    return {**row, "prompt": prompt, "responses": normalised, "ranking": list(ranking)}


def _prompt(row: dict, where: str) -> dict:
    prompt = _as_messages(_require(row, "prompt", where), "prompt", where, "user")
    metadata = row.get("metadata")
    if metadata is None:
        metadata = {}
    if not isinstance(metadata, dict):
        raise _fail(where, "metadata", f"expected an object, got {_type_name(metadata)}")
    scorer = metadata.get("scorer")
    if scorer is not None and not isinstance(scorer, str):
        raise _fail(where, "metadata.scorer", f"expected a scorer name (string), got {_type_name(scorer)}")
    return {**row, "prompt": prompt, "metadata": metadata}


_VALIDATORS = {
    "chat": _chat,
    "prompt_completion": _prompt_completion,
    "preference": _preference,
    "ranking": _ranking,
    "prompt": _prompt,
}
