"""Offline reward-model data from the task suite: correct chains and corrupted ones.

Every problem has a reference chain (all steps correct); `Task.corrupt` writes a plausible
wrong chain with a known first wrong step, and `Task.check_steps` labels each step (correct
up to the first error, wrong from there on). From these:

- `prm_records`: process-RM records in TRL's stepwise form,
  ``{"prompt": [user msg], "completions": [step, ...], "labels": [1, 1, 0, ...], "final": "Answer: x"}``;
  per problem the correct chain and ``n_corrupt`` corrupted ones.
- `preference_records`: ``{"prompt", "chosen", "rejected"}`` with chosen = the correct
  response and rejected = a corrupted one (responses in the task format, steps joined by
  ``step_sep``).
- `ranking_records`: ``{"prompt", "responses", "ranking"}``: the correct response first, then
  corrupted ones ordered by first wrong step, LATER first (more correct steps ranks higher);
  only corruptions with distinct first-error steps are kept, so the order is strict (a
  one-step problem gives a two-item ranking).
- `write_reward_data`: the three files for a split, as JSONL.

Randomness comes only from ``seed`` (one `random.Random` per call), so output is reproducible.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from pathlib import Path

from posttrain.data.tasks.base import Problem
from posttrain.data.tasks.registry import get_task
from posttrain.data.tasks.split import Split, task_problems

DEFAULT_SEP = "<step>"


def _prompt(p: Problem) -> list[dict]:
    return [{"role": "user", "content": p.question}]


def _chain_record(p: Problem, steps: Sequence[str], labels: Sequence[bool], answer: str, kind: str) -> dict:
    return {
        "prompt": _prompt(p),
        "completions": list(steps),
        "labels": [int(x) for x in labels],
        "final": f"Answer: {answer}",
        "metadata": {"task": p.task, "level": p.level, "ground_truth": p.answer, "chain": kind},
    }


def prm_records(problems: Sequence[Problem], n_corrupt: int = 1, seed: int = 0) -> list[dict]:
    """Per problem: its correct chain (all labels 1) and `n_corrupt` corrupted chains.

    Corrupted labels come from `Task.check_steps`: 1 before the first wrong step, 0 from it on.
    """
    rng = random.Random(seed)
    out = []
    for p in problems:
        task = get_task(p.task)
        out.append(_chain_record(p, p.steps, [True] * len(p.steps), p.answer, "correct"))
        for _ in range(n_corrupt):
            wrong, _ = task.corrupt(rng, p)
            out.append(
                _chain_record(p, wrong.steps, task.check_steps(p, wrong.steps), wrong.answer, "corrupted")
            )
    return out


def preference_records(problems: Sequence[Problem], step_sep: str = DEFAULT_SEP, seed: int = 0) -> list[dict]:
    """Per problem: chosen = the correct response, rejected = a corrupted one."""
    rng = random.Random(seed)
    out = []
    for p in problems:
        wrong, first = get_task(p.task).corrupt(rng, p)
        out.append(
            {
                "prompt": _prompt(p),
                "chosen": p.response(step_sep),
                "rejected": wrong.response(step_sep),
                "metadata": {"task": p.task, "level": p.level, "first_wrong_step": first},
            }
        )
    return out


def ranking_records(
    problems: Sequence[Problem], step_sep: str = DEFAULT_SEP, max_responses: int = 4, seed: int = 0
) -> list[dict]:
    """Per problem: correct > corrupted with a later first error > ... > earlier first error.

    Up to ``max_responses - 1`` corruptions with distinct first wrong steps (drawn with a
    bounded number of tries); responses are shuffled and `ranking` lists indices best first.
    """
    rng = random.Random(seed)
    out = []
    for p in problems:
        task = get_task(p.task)
        by_first: dict[int, Problem] = {}
        for _ in range(4 * max_responses):
            wrong, first = task.corrupt(rng, p)
            by_first.setdefault(first, wrong)
            if len(by_first) >= max_responses - 1:
                break
        ordered = [p] + [by_first[k] for k in sorted(by_first, reverse=True)][: max_responses - 1]
        order = list(range(len(ordered)))
        rng.shuffle(order)  # position in `responses` must not reveal the rank
        responses = [ordered[i].response(step_sep) for i in order]
        ranking = sorted(range(len(order)), key=lambda i: order[i])
        meta = {"task": p.task, "level": p.level, "first_wrong_steps": sorted(by_first, reverse=True)}
        out.append({"prompt": _prompt(p), "responses": responses, "ranking": ranking, "metadata": meta})
    return out


def write_reward_data(
    out_dir: str | Path,
    tasks: Sequence[str] = ("arith", "countdown", "sort"),
    split: Split = "train",
    n_per_level: int = 200,
    seed: int = 0,
    step_sep: str = DEFAULT_SEP,
) -> dict[str, Path]:
    """Write ``{split}_prm.jsonl``, ``{split}_pairs.jsonl`` and ``{split}_rankings.jsonl`` to `out_dir`."""
    from posttrain.data.loaders import write_jsonl

    problems = task_problems(tasks, split, n_per_level, seed)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    files = {
        "prm": (prm_records(problems, seed=seed), out / f"{split}_prm.jsonl"),
        "pairs": (preference_records(problems, step_sep, seed=seed), out / f"{split}_pairs.jsonl"),
        "rankings": (ranking_records(problems, step_sep, seed=seed), out / f"{split}_rankings.jsonl"),
    }
    for rows, path in files.values():
        write_jsonl(path, rows)
    return {name: path for name, (_, path) in files.items()}
