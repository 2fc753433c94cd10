"""User prompt files for `posttrain search`: prompt records instead of the task suite.

A prompt record is ``{"prompt": str | [messages], "metadata": {"scorer": NAME, "ground_truth":
..., "level"?: int}}`` (JSONL, JSON, Parquet or a saved HF dataset folder; the data layer's
``prompt`` kind). ``metadata.scorer`` names the reward (`posttrain.rewards.registry`) that checks
an answer -- a task name (``arith``...) or ``math``, ``code``...; the search grades with it and the
``verifier`` scorer uses it. Rows of the table's per-level accuracy are ``scorer/L<level>``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from posttrain.errors import DataError
from posttrain.search.protocols import Query


@dataclass
class PromptProblem:
    """One prompt record, shaped like a task `Problem` where the search reads it."""

    task: str
    """The record's ``metadata.scorer`` (the reward that verifies an answer)."""
    level: int
    question: str
    """The last user turn's text."""
    answer: str
    """``metadata.ground_truth`` as text."""
    messages: list[dict[str, Any]] = field(default_factory=list)
    metadata: dict[str, Any] = field(default_factory=dict)
    where: str = ""

    def verify(self, text: str) -> bool:
        from posttrain.search.scorers import any_verifier

        return bool(any_verifier().verify(text, self.query_metadata()))

    def query_metadata(self) -> dict[str, Any]:
        meta = {**self.metadata, "question": self.question, "level": self.level}
        if self.task_suite():
            meta["task"] = self.task
        return meta

    def task_suite(self) -> bool:
        from posttrain.data.tasks import TASKS

        return self.task in TASKS


def load_prompt_problems(path: str, limit: int | None = None) -> list[PromptProblem]:
    """The prompt records of ``path`` as problems; a record without scorer or ground truth is an error."""
    from posttrain.data.loaders import load_records

    out = []
    for rec in load_records(path, kind="prompt", limit=limit):
        meta = dict(rec.data.get("metadata") or {})
        if not isinstance(meta.get("scorer"), str) or "ground_truth" not in meta:
            raise DataError(
                "prompt record needs metadata.scorer and metadata.ground_truth to be graded",
                where=rec.where,
                fix='e.g. {"prompt": "What is 2+3?", "metadata": {"scorer": "math", "ground_truth": "5"}}',
            )
        prompt = rec.data["prompt"]
        messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)
        users = [m for m in messages if m.get("role") == "user"]
        question = str(users[-1]["content"]) if users else str(messages[-1].get("content", ""))
        out.append(PromptProblem(meta["scorer"], int(meta.get("level", 1)), question, str(meta["ground_truth"]),
                                 messages, meta, rec.where))  # fmt: skip
    if not out:
        raise DataError("no prompt records", where=path, fix="write one {prompt, metadata} record per line")
    return out


def prompt_queries(problems: Sequence[PromptProblem], tokenizer: Any = None) -> list[Query]:
    """Queries: the chat template's generation prompt (with a tokenizer), else ``question + "\\n"``."""
    out = []
    for p in problems:
        prompt = (
            tokenizer.apply_chat_template(p.messages, add_generation_prompt=True, tokenize=False)
            if tokenizer is not None
            else p.question + "\n"
        )
        out.append(Query(prompt, p.query_metadata()))
    return out
