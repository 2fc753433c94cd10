"""Answer verification: score records that name a scorer, and check that the chain reaches the answer.

A record is scored when it has one response (``chat``: its last assistant turn;
``prompt_completion``: its completion) and ``metadata.scorer``: the reward registry's
`score_batch` runs the scorer on batches, so ``math`` goes through math-verify
(`posttrain.rewards.math_verify`), ``code``/``code_partial`` run the tests in the sandbox
(`posttrain.rewards.sandbox`) and a task-suite name uses that task's verifier. A score below
``min_score`` drops the record as ``unverified``; the evidence has the scorer, score and why.
The completion scored is ``<think>{reasoning_content}</think>\\n{content}`` when the reasoning
is stored apart, which is what the model was trained to write.

Chain consistency (`chain_consistent`): the stated answer (``\\boxed{}``, "answer is",
"Answer:"), read as a number or as + - * / arithmetic (a countdown expression), must equal
the last number of the reasoning's last line. Records without reasoning, without a stated
answer, or whose answer is not a single value (a sorted list) are not checked by it.
Other record kinds pass through unscored.
"""

from __future__ import annotations

import ast
import operator
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from fractions import Fraction
from typing import Any

from posttrain.data.quality.items import Item, chunks
from posttrain.errors import ConfigError

THINK_OPEN, THINK_CLOSE = "<think>", "</think>"
STATED = ("boxed", "answer_is", "answer_colon")
_OPS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv}


@dataclass
class VerifyConfig:
    """Answer verification (both off by default)."""

    answers: bool = False
    """Score records with metadata.scorer by that reward (math-verify, sandbox, task verifier)."""
    min_score: float = 1.0
    """Scores below this drop the record (rule ``unverified``)."""
    chain: bool = False
    """Drop records whose reasoning does not end on the stated answer (rule ``unverified``)."""
    batch_size: int = 64
    """Records per scorer call (the sandbox runs a batch's programs on its thread pool)."""

    def validate(self) -> None:
        if self.batch_size < 1:
            raise ConfigError("verify.batch_size must be >= 1", where="verify.batch_size")


def response_of(data: dict, kind: str) -> tuple[list[dict], dict] | None:
    """``(prompt messages, the final assistant message)`` of a one-response record, else None."""
    if kind == "chat":
        messages = data["messages"]
        last = max(i for i, m in enumerate(messages) if m["role"] == "assistant")
        return messages[:last], messages[last]
    if kind == "prompt_completion":
        answers = [m for m in data["completion"] if m["role"] == "assistant"]
        return data["prompt"], answers[-1]
    return None


def split_reasoning(message: dict) -> tuple[str, str]:
    """``(reasoning, answer text)``: ``reasoning_content`` or the ``<think>`` block, and the rest."""
    content = message["content"]
    if message.get("reasoning_content"):
        return message["reasoning_content"], content
    if THINK_CLOSE in content:
        head, tail = content.rsplit(THINK_CLOSE, 1)
        return head.split(THINK_OPEN, 1)[-1], tail
    return "", content


def completion_text(message: dict) -> str:
    """What the scorer reads: ``<think>reasoning</think>\\nanswer`` or the content alone."""
    reasoning = message.get("reasoning_content")
    return f"{THINK_OPEN}{reasoning}{THINK_CLOSE}\n{message['content']}" if reasoning else message["content"]


def arith_value(text: str) -> Fraction | None:
    """The exact value of a number or a + - * / expression of numbers, else None."""
    try:
        tree = ast.parse(text.strip().replace("×", "*").replace("÷", "/"), mode="eval")
        return _eval(tree.body)
    except (SyntaxError, ValueError, ZeroDivisionError, RecursionError):
        return None


def _eval(node: ast.AST) -> Fraction:
    if (
        isinstance(node, ast.Constant)
        and isinstance(node.value, int | float)
        and not isinstance(node.value, bool)
    ):
        return Fraction(str(node.value))
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub | ast.UAdd):
        value = _eval(node.operand)
        return -value if isinstance(node.op, ast.USub) else value
    if isinstance(node, ast.BinOp) and type(node.op) in _OPS:
        return _OPS[type(node.op)](_eval(node.left), _eval(node.right))
    raise ValueError("not arithmetic")


def chain_consistent(reasoning: str, answer_text: str) -> tuple[bool | None, str]:
    """Whether the reasoning's last line ends on the stated answer; None when there is nothing to check."""
    from posttrain.rewards.verifiers import extract_math_answer

    lines = [line.strip() for line in reasoning.splitlines() if line.strip()]
    answer = extract_math_answer(answer_text, order=STATED)
    if not lines or not answer:
        return None, "no reasoning or no stated answer"
    last = lines[-1]
    value = arith_value(answer)
    if value is None:
        return None, f"the answer {answer!r} is not a number or an arithmetic expression"
    ends_on = extract_math_answer(last, order=(*STATED, "last_number"))
    if ends_on is not None and arith_value(ends_on) == value:
        return True, f"reasoning ends on {ends_on}"
    return False, f"stated answer {answer!r} but the reasoning ends on {last[-80:]!r}"


def _scorer_rows(items: list[Item]) -> list[tuple[Item, list[dict], str, dict]]:
    rows = []
    for item in items:
        meta = item.data.get("metadata")
        parts = response_of(item.data, item.kind)
        if isinstance(meta, dict) and isinstance(meta.get("scorer"), str) and parts is not None:
            rows.append((item, parts[0], completion_text(parts[1]), meta))
    return rows


def verify_answers(
    items: Iterable[Item], cfg: VerifyConfig, score: Callable[..., list[Any]] | None = None
) -> Iterator[Item]:
    """Drop items whose answer scores below ``cfg.min_score`` or whose chain is inconsistent.

    ``score`` is `posttrain.rewards.registry.score_batch` unless given (same signature)."""
    if cfg.answers and score is None:
        from posttrain.rewards.registry import score_batch as score
    for batch in chunks(items, cfg.batch_size):
        alive = [it for it in batch if it.removed is None]
        if cfg.chain:
            for item in alive:
                parts = response_of(item.data, item.kind)
                if parts is not None:
                    ok, why = chain_consistent(*split_reasoning(parts[1]))
                    if ok is False:
                        item.drop("unverified", check="chain", why=why)
        rows = _scorer_rows([it for it in alive if it.removed is None]) if cfg.answers else []
        if rows:
            results = score([r[1] for r in rows], [r[2] for r in rows], [r[3] for r in rows])
            for (item, *_), res in zip(rows, results, strict=True):
                if res.score < cfg.min_score:
                    scorer = res.info.get("scorer", item.data["metadata"]["scorer"])
                    item.drop("unverified", check="scorer", scorer=scorer, score=res.score, why=res.why)
        yield from batch
