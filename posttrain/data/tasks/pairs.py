"""Offline preference pairs from the task suite: a verified-correct solution vs a wrong or malformed one.

For each generated problem the chosen response is the reference chain of
thought (``Problem.response``), checked with the task's verifier; the rejected
response is one of:

- ``wrong``: `Task.corrupt` -- a plausible chain with one slip, so the final
  answer is wrong (re-drawn until the verifier rejects it);
- ``no_answer``: the correct chain with the ``Answer:`` line left out;
- ``truncated``: the chain cut after some steps, ``</think>`` never closed.

``malformed`` is the share of malformed rejections (the rest are ``wrong``).
`pairs_from_completions` labels a policy's own samples the same way (the
building block of iterative, on-policy DPO).
Records are preference records (`posttrain.data.records`) whose metadata names
the task, level, ground truth and the kind of rejection. Everything is
deterministic in (task, split, level, seed).
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import Sequence
from typing import Any

from posttrain.data.tasks.base import THINK_OPEN, Problem, Task
from posttrain.data.tasks.registry import get_task
from posttrain.data.tasks.split import Split, make_split
from posttrain.errors import ConfigError, DataError

REJECTION_KINDS = ("wrong", "no_answer", "truncated")
_MAX_CORRUPT_TRIES = 20


def _rng(task: str, split: str, seed: int, question: str, index: int) -> random.Random:
    key = f"pairs|{task}|{split}|{seed}|{index}|{question}".encode()
    return random.Random(int.from_bytes(hashlib.sha256(key).digest()[:8], "big"))


def malformed_response(rng: random.Random, problem: Problem, kind: str, step_sep: str) -> str:
    """A response for ``problem`` that no verifier accepts: ``no_answer`` or ``truncated``."""
    if kind == "no_answer":
        return problem.response(step_sep).rsplit("\n", 1)[0]
    if kind == "truncated":
        k = rng.randrange(len(problem.steps)) if len(problem.steps) > 1 else 0
        return THINK_OPEN + step_sep.join(problem.steps[: k + 1])
    raise ConfigError(f"unknown malformed kind {kind!r}", where="kind", fix="use no_answer or truncated")


def rejected_response(
    rng: random.Random, task: Task, problem: Problem, step_sep: str, malformed: float
) -> tuple[str, str, int | None]:
    """(response, kind, first wrong step or None) of a response the task's verifier rejects."""
    if rng.random() >= malformed:
        for _ in range(_MAX_CORRUPT_TRIES):
            wrong, first_wrong = task.corrupt(rng, problem)
            text = wrong.response(step_sep)
            if not task.verify(text, problem.answer):
                return text, "wrong", first_wrong
    kind = rng.choice(("no_answer", "truncated"))
    return malformed_response(rng, problem, kind, step_sep), kind, None


def pair_record(
    task: Task, problem: Problem, rng: random.Random, step_sep: str = "\n", malformed: float = 0.25
) -> dict[str, Any]:
    """One preference record for ``problem``; the chosen response must pass the verifier."""
    chosen = problem.response(step_sep)
    if not task.verify(chosen, problem.answer):
        raise DataError(
            f"the reference solution of {problem.question!r} fails the {task.name} verifier",
            where=f"task:{task.name}",
            fix="fix the task's generator or verifier",
        )
    rejected, kind, first_wrong = rejected_response(rng, task, problem, step_sep, malformed)
    return {
        "prompt": [{"role": "user", "content": problem.question}],
        "chosen": [{"role": "assistant", "content": chosen}],
        "rejected": [{"role": "assistant", "content": rejected}],
        "metadata": {
            "task": task.name,
            "level": problem.level,
            "ground_truth": problem.answer,
            "rejected_kind": kind,
            "first_wrong_step": first_wrong,
        },
    }


def make_pairs(
    task: str | Task,
    split: Split,
    n_per_level: int,
    seed: int = 0,
    levels: Sequence[int] | None = None,
    *,
    step_sep: str = "\n",
    malformed: float = 0.25,
) -> list[dict[str, Any]]:
    """Preference records for ``n_per_level`` problems of each level of ``task`` (see the module docstring).

    The problems are `make_split`'s, so train and test pairs never share a question.
    """
    task = get_task(task) if isinstance(task, str) else task
    if not 0.0 <= malformed <= 1.0:
        raise ConfigError(f"malformed must be in [0, 1], got {malformed!r}", where="malformed")
    problems = make_split(task, split, n_per_level, seed=seed, levels=levels)
    return [
        pair_record(task, p, _rng(task.name, split, seed, p.question, i), step_sep, malformed)
        for i, p in enumerate(problems)
    ]


def pairs_from_completions(
    task: str | Task, problem: Problem, completions: Sequence[str], max_pairs: int = 1
) -> list[dict[str, Any]]:
    """On-policy pairs for iterative DPO: sampled completions labelled by the task's verifier.

    Pairs each verified-correct completion with an incorrect one (in sampling order,
    distinct texts), up to ``max_pairs``; a problem whose samples are all right or
    all wrong gives no pair (it carries no preference signal).
    """
    task = get_task(task) if isinstance(task, str) else task
    right = list(dict.fromkeys(c for c in completions if task.verify(c, problem.answer)))
    wrong = list(dict.fromkeys(c for c in completions if not task.verify(c, problem.answer)))
    meta = {
        "task": task.name,
        "level": problem.level,
        "ground_truth": problem.answer,
        "rejected_kind": "sampled",
    }
    return [
        {
            "prompt": [{"role": "user", "content": problem.question}],
            "chosen": [{"role": "assistant", "content": c}],
            "rejected": [{"role": "assistant", "content": r}],
            "metadata": meta,
        }
        for c, r in list(zip(right, wrong, strict=False))[:max_pairs]
    ]
