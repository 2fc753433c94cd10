"""Stateless verifiers: answer extraction, format checks, length shaping, task answers.

Pure functions over strings; the math equivalence check (which needs worker processes)
is in `posttrain.rewards.math_verify`, the code sandbox in `posttrain.rewards.sandbox`.
Only text after the last ``</think>`` counts as the answer; a ``<think>`` that is never
closed means the model is still thinking (no answer), as in `posttrain.data.tasks`.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

from posttrain.data.tasks import get_task
from posttrain.errors import ConfigError

THINK_OPEN, THINK_CLOSE = "<think>", "</think>"
ANSWER_MARKER = "Answer:"
EXTRACTORS = ("boxed", "answer_is", "answer_colon", "last_number")
_BOX_RE = re.compile(r"\\(?:boxed|fbox)\b")
_ANSWER_IS_RE = re.compile(r"answer is\s*:?\s*(.+)", re.IGNORECASE)
_ANSWER_COLON_RE = re.compile(r"answer\s*:\s*(.+)", re.IGNORECASE)
_NUMBER_RE = re.compile(r"-?\d+(?:,\d{3})+(?![\d])(?:\.\d+)?|-?\d+(?:\.\d+)?(?:/\d+)?")
_FENCE_RE = re.compile(r"```[ \t]*(?:python3?|py)?[ \t]*\n(.*?)```", re.DOTALL | re.IGNORECASE)


def answer_region(completion: str) -> str | None:
    """The text after the last ``</think>``; the whole text without think tags; None mid-thought."""
    if THINK_CLOSE in completion:
        return completion.rsplit(THINK_CLOSE, 1)[1]
    if THINK_OPEN in completion:
        return None
    return completion


def _braced(text: str, start: int) -> str | None:
    """The content of the ``{...}`` opening at ``text[start]``, nested braces matched.

    Escaped braces (``\\{``, ``\\}``) are literal and do not count.
    """
    depth = 0
    i = start
    while i < len(text):
        ch = text[i]
        if ch == "\\":
            i += 2
            continue
        if ch == "{":
            depth += 1
        elif ch == "}":
            depth -= 1
            if depth == 0:
                return text[start + 1 : i]
        i += 1
    return None


def extract_boxed(text: str) -> str | None:
    """The content of the last well-formed ``\\boxed{...}`` (or ``\\fbox{...}``), nested braces
    included; ``\\boxed 5`` (no braces) gives the next token. None if there is none."""
    for match in reversed(list(_BOX_RE.finditer(text))):
        rest = match.end()
        while rest < len(text) and text[rest] == " ":
            rest += 1
        if rest < len(text) and text[rest] == "{":
            inner = _braced(text, rest)
            if inner is not None:
                return inner.strip()
        elif rest > match.end():
            token = re.match(r"[^\s$]+", text[rest:])
            if token:
                return token.group(0)
    return None


def _clean(answer: str) -> str | None:
    """Strip markdown bold, surrounding ``$``, ``\\(\\)`` and one trailing period."""
    text = answer.strip().strip("*").strip()
    if text.startswith("\\(") and text.endswith("\\)"):
        text = text[2:-2].strip()
    text = text.strip("$").strip().removesuffix(".").strip().strip("$").strip()
    return text or None


def _last_line_match(pattern: re.Pattern, text: str) -> str | None:
    matches = list(pattern.finditer(text))
    if not matches:
        return None
    line = matches[-1].group(1).splitlines()[0] if matches[-1].group(1) else ""
    inner = extract_boxed(line)
    return inner if inner is not None else _clean(line)


def extract_math_answer(completion: str, order: Sequence[str] = EXTRACTORS) -> str | None:
    """The final answer of a math completion, trying the extractors in ``order``.

    ``boxed``: last ``\\boxed{}``; ``answer_is``: the rest of the line after the last
    "answer is"; ``answer_colon``: after the last "Answer:" (any case); ``last_number``:
    the last integer, decimal or a/b fraction (thousands separators dropped). Only the
    `answer_region` is searched.
    """
    unknown = [name for name in order if name not in EXTRACTORS]
    if unknown:
        raise ConfigError(
            f"unknown answer extractors {unknown}", where="order", fix=f"use some of {EXTRACTORS}"
        )
    text = answer_region(completion)
    if text is None:
        return None
    for name in order:
        if name == "boxed":
            found = extract_boxed(text)
        elif name == "answer_is":
            found = _last_line_match(_ANSWER_IS_RE, text)
        elif name == "answer_colon":
            found = _last_line_match(_ANSWER_COLON_RE, text)
        else:
            numbers = _NUMBER_RE.findall(text)
            found = numbers[-1].replace(",", "") if numbers else None
        if found:
            return found
    return None


def check_format(completion: str) -> tuple[float, str]:
    """1.0 if the completion is ``<think>reasoning</think>`` then one ``Answer: x`` line, else 0.0.

    Rules (leading/trailing whitespace ignored): it starts with ``<think>``; exactly one
    ``<think>`` and one ``</think>``; non-empty reasoning; after ``</think>`` only
    whitespace, then exactly one ``Answer:`` whose line is non-empty and is the last line.
    Returns (score, why).
    """
    text = completion.strip()
    if text.count(THINK_OPEN) != 1 or text.count(THINK_CLOSE) != 1:
        return 0.0, "needs exactly one <think> and one </think>"
    if not text.startswith(THINK_OPEN):
        return 0.0, "must start with <think>"
    thought, tail = text[len(THINK_OPEN) :].split(THINK_CLOSE, 1)
    if not thought.strip():
        return 0.0, "empty <think> block"
    if tail.count(ANSWER_MARKER) != 1:
        return 0.0, f"needs exactly one {ANSWER_MARKER!r} after </think>"
    before, answer = tail.split(ANSWER_MARKER, 1)
    if before.strip():
        return 0.0, f"text between </think> and {ANSWER_MARKER!r}"
    if not answer.strip():
        return 0.0, "empty answer"
    if "\n" in answer.strip():
        return 0.0, "text after the answer line"
    return 1.0, "ok"


def overlong_penalty(length: int, max_length: int, buffer: int) -> float:
    """DAPO's soft overlong punishment for a response of ``length`` tokens.

    0 if ``length <= max_length - buffer``; ``(max_length - buffer - length) / buffer``
    (linear from 0 down to -1) up to ``max_length``; -1 beyond. ``buffer == 0`` is a hard
    cut at ``max_length``.
    """
    if max_length <= 0 or not 0 <= buffer <= max_length:
        raise ConfigError(
            f"overlong penalty needs max_length > 0 and 0 <= buffer <= max_length, got {max_length}, {buffer}",
            where="max_length/buffer",
        )
    if length > max_length:
        return -1.0
    if length <= max_length - buffer:
        return 0.0
    return (max_length - buffer - length) / buffer


def extract_code(completion: str) -> str:
    """The last fenced code block (```python, ```py or bare ```) of the answer region, else the region."""
    text = answer_region(completion)
    if text is None:
        return ""
    blocks = _FENCE_RE.findall(text)
    return blocks[-1] if blocks else text.strip()


def verify_task(completion: str, task: str, ground_truth: str) -> bool:
    """The embedded task suite's verdict (`posttrain.data.tasks`) on a completion."""
    return bool(get_task(task).verify(completion, ground_truth))
