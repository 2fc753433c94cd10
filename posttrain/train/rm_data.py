"""Data for reward-model training: ranked response groups (outcome RM) and step-labelled chains (PRM).

Sources (``data.train`` / ``data.eval``): a file (JSONL / JSON / Parquet / saved dataset)
or ``tasks`` (generated from the task suite by `posttrain.data.tasks.prm_data`).

- Outcome RM: preference records ``{prompt, chosen, rejected, margin?}`` become a group of
  two; ranking records ``{prompt, responses, ranking}`` a group in ranking order (best
  first). Each response is rendered with the model's chat template as ``prompt + response``.
- Process RM: stepwise records ``{prompt, completions: [step, ...], labels: [y, ...],
  final?}`` (TRL's form; y in [0, 1] or bool). The response is rendered as
  `posttrain.models.heads.prm_response` and each label lands on its step-end token
  (`posttrain.models.heads.step_end_mask`); a record whose step-end tokens do not match
  its labels one to one is an error naming it.

Over-long examples (any response longer than ``max_len`` tokens) are dropped and counted.
Batches are right-padded (no packing); `ExamplePlan` orders them deterministically per epoch.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import torch

from posttrain.data.collate import IGNORE_INDEX, bucket_batches
from posttrain.data.render import render_prompt_completion
from posttrain.data.sft_data import resolve_step_sep
from posttrain.errors import ConfigError, DataError
from posttrain.models.heads import prm_response, single_token_id, step_end_mask


@dataclass
class RMDataConfig:
    """Where outcome-RM data comes from and how long it may be."""

    train: str = "tasks"
    """Preference or ranking records (file), or `tasks` for pairs/rankings from the task suite."""
    eval: str | None = "tasks"
    """Held-out data in the same forms (`tasks` = the suite's test split); null disables eval."""
    tasks: list[str] = field(default_factory=lambda: ["arith", "countdown", "sort"])
    """Task names used when train/eval is `tasks`."""
    levels: list[int] | None = None
    """Difficulty levels to include (null = all levels of each task)."""
    n_per_level: int = 200
    """Training problems per task and level (tasks only)."""
    eval_n_per_level: int = 25
    """Held-out problems per task and level (tasks only)."""
    task_format: Literal["pairs", "rankings"] = "pairs"
    """tasks only: pairs (correct vs one corrupted) or rankings (correct > later first error > earlier)."""
    max_responses: int = 4
    """tasks + rankings: at most this many responses per prompt."""
    step_sep: str = "auto"
    """Step separator in task responses; `auto` = `<step>` if the tokenizer has it, else a newline."""
    max_len: int = 512
    """Groups with a response longer than this many tokens are dropped (and counted)."""
    limit: int | None = None
    """Use only the first N records of a file."""
    seed: int = 0
    """Seed of the task-suite split and of the corruptions."""


@dataclass
class PRMDataConfig:
    """Where process-RM data comes from and how steps are marked."""

    train: str = "tasks"
    """Stepwise records {prompt, completions, labels} (file), or `tasks` for the task suite."""
    eval: str | None = "tasks"
    """Held-out data in the same forms (`tasks` = the suite's test split); null disables eval."""
    tasks: list[str] = field(default_factory=lambda: ["arith", "countdown", "sort"])
    """Task names used when train/eval is `tasks`."""
    levels: list[int] | None = None
    """Difficulty levels to include (null = all levels of each task)."""
    n_per_level: int = 200
    """Training problems per task and level (tasks only)."""
    eval_n_per_level: int = 25
    """Held-out problems per task and level (tasks only)."""
    n_corrupt: int = 1
    """tasks only: corrupted chains per problem, besides its correct chain."""
    step_sep: str = "auto"
    """Token ending every step but the last; `auto` = `<step>`. Must be one token in the tokenizer."""
    last_step_end: str = "</think>"
    """Token ending the last step (the chain is wrapped in <think>..</think>); empty = the separator follows the last step too."""
    max_len: int = 512
    """Chains longer than this many tokens are dropped (and counted)."""
    limit: int | None = None
    """Use only the first N records of a file."""
    seed: int = 0
    """Seed of the task-suite split and of the corruptions."""


@dataclass
class RankedGroup:
    """One prompt's responses, tokenised with the prompt, in ranking order (best first)."""

    responses: list[list[int]]
    margin: float
    where: str


@dataclass
class StepSample:
    """A prompt + chain; ``step_labels[t]`` is the label of the step ending at token t, else -1."""

    input_ids: list[int]
    step_labels: list[float]
    where: str
    group: str = ""
    """The question (its prompt as JSON): chains of one question share it (`prm` pair_weight)."""


def _stats(lengths: list[int], dropped: int, max_len: int) -> dict:
    if not lengths and dropped:
        raise DataError(
            f"every example is longer than data.max_len={max_len} tokens and was dropped",
            fix="raise data.max_len",
        )
    if not lengths:
        raise DataError("no records", fix="point data.train at a non-empty file")
    n = len(lengths)
    return {
        "samples": n,
        "tokens": sum(lengths),
        "mean_len": sum(lengths) / n,
        "max_len": max(lengths),
        "dropped": dropped,
    }


def _task_problems(cfg: RMDataConfig | PRMDataConfig, split: str):
    from posttrain.data.tasks import task_problems

    n = cfg.n_per_level if split == "train" else cfg.eval_n_per_level
    return task_problems(cfg.tasks, "train" if split == "train" else "test", n, cfg.seed, cfg.levels)


def _source(cfg: RMDataConfig | PRMDataConfig, split: str) -> str | None:
    return cfg.train if split == "train" else cfg.eval


def rm_records(tokenizer: Any, cfg: RMDataConfig, split: str) -> list[tuple[dict, str]]:
    """The raw preference / ranking records of one split, with where each came from."""
    from posttrain.data.loaders import load_records
    from posttrain.data.tasks import prm_data

    source = _source(cfg, split)
    if source != "tasks":
        records = [(r.data, r.where) for r in load_records(source, limit=cfg.limit)]
        for row, where in records[:1]:
            if not ("chosen" in row or "ranking" in row):
                raise DataError(
                    f"reward-model data must be preference or ranking records; got keys {sorted(row)}",
                    where=where,
                    fix="write {prompt, chosen, rejected} or {prompt, responses, ranking} lines",
                )
        return records
    problems = _task_problems(cfg, split)
    sep = resolve_step_sep(tokenizer, cfg.step_sep)
    if cfg.task_format == "pairs":
        rows = prm_data.preference_records(problems, sep, seed=cfg.seed)
    else:
        rows = prm_data.ranking_records(problems, sep, cfg.max_responses, seed=cfg.seed)
    return [(row, f"task:{row['metadata']['task']}/{split}/{i}") for i, row in enumerate(rows)]


def rm_groups(
    tokenizer: Any, cfg: RMDataConfig, split: str, margin: float = 0.0
) -> tuple[list[RankedGroup], dict]:
    """Tokenised groups of one split and summary stats; `margin` is used where a record has none."""
    if _source(cfg, split) is None:
        return [], {}
    groups, dropped = [], 0
    for row, where in rm_records(tokenizer, cfg, split):
        if "chosen" in row:
            ordered = [row["chosen"], row["rejected"]]
        else:
            ordered = [row["responses"][i] for i in row["ranking"]]
        ids = [render_prompt_completion(tokenizer, row["prompt"], r, where).input_ids for r in ordered]
        if max(len(x) for x in ids) > cfg.max_len:
            dropped += 1
            continue
        m = row.get("margin", margin)
        if not isinstance(m, int | float) or isinstance(m, bool):
            raise DataError(f"margin: expected a number, got {m!r}", where=where)
        groups.append(RankedGroup(ids, float(m), where))
    return groups, _stats([len(x) for g in groups for x in g.responses], dropped, cfg.max_len)


def _check_stepwise(row: dict, where: str) -> list[float]:
    steps, labels = row.get("completions"), row.get("labels")
    if not isinstance(steps, list) or not steps or not all(isinstance(s, str) and s.strip() for s in steps):
        raise DataError("completions: expected a non-empty list of step strings", where=where)
    ok = isinstance(labels, list) and len(labels) == len(steps)
    ok = ok and all(isinstance(y, int | float) and 0.0 <= float(y) <= 1.0 for y in labels)
    if not ok:
        raise DataError(
            f"labels: expected {len(steps)} numbers in [0, 1] (one per step, bools allowed), got {labels!r}",
            where=where,
        )
    return [float(y) for y in labels]


def prm_records(cfg: PRMDataConfig, split: str) -> list[tuple[dict, str]]:
    """The raw stepwise records of one split, with where each came from."""
    from posttrain.data.loaders import load_records
    from posttrain.data.tasks import prm_data

    source = _source(cfg, split)
    if source != "tasks":
        return [(r.data, r.where) for r in load_records(source, kind="prompt", limit=cfg.limit)]
    rows = prm_data.prm_records(_task_problems(cfg, split), cfg.n_corrupt, seed=cfg.seed)
    return [(row, f"task:{row['metadata']['task']}/{split}/{i}") for i, row in enumerate(rows)]


def step_sample(
    tokenizer: Any,
    prompt: Any,
    steps: list[str],
    labels: list[float],
    seps: tuple,
    where: str,
    final: str = "",
) -> StepSample:
    """Render one chain and put each step's label on its step-end token.

    seps: (step_sep, last_step_end, sep_id, end_id or None), see `prm_token_ids`.
    """
    step_sep, last_end, sep_id, end_id = seps
    if any(step_sep in s or (last_end and last_end in s) for s in steps):
        raise DataError(f"a step contains the separator {step_sep!r} or {last_end!r}", where=where)
    sample = render_prompt_completion(
        tokenizer, prompt, prm_response(steps, step_sep, last_end, final), where
    )
    ids = torch.tensor([sample.input_ids])
    start = next(i for i, y in enumerate(sample.labels) if y != IGNORE_INDEX)
    positions = step_end_mask(ids, torch.tensor([start]), sep_id, end_id)[0].nonzero().flatten().tolist()
    if len(positions) != len(labels):
        raise DataError(
            f"found {len(positions)} step-end tokens for {len(labels)} step labels",
            where=where,
            fix="the chat template must keep the response text as written (and its <think> block)",
        )
    step_labels = [-1.0] * len(sample.input_ids)
    for p, y in zip(positions, labels, strict=True):
        step_labels[p] = y
    return StepSample(sample.input_ids, step_labels, where)


def prm_token_ids(tokenizer: Any, step_sep: str, last_step_end: str) -> tuple[str, str, int, int | None]:
    """(step_sep, last_step_end, sep_id, end_id): both markers must be single tokens."""
    sep = "<step>" if step_sep == "auto" else step_sep
    sep_id = single_token_id(tokenizer, sep, "data.step_sep")
    end_id = single_token_id(tokenizer, last_step_end, "data.last_step_end") if last_step_end else None
    return sep, last_step_end, sep_id, end_id


def prm_samples(tokenizer: Any, cfg: PRMDataConfig, split: str) -> tuple[list[StepSample], dict]:
    """Tokenised step-labelled chains of one split and summary stats."""
    if _source(cfg, split) is None:
        return [], {}
    seps = prm_token_ids(tokenizer, cfg.step_sep, cfg.last_step_end)
    samples, dropped = [], 0
    for row, where in prm_records(cfg, split):
        labels = _check_stepwise(row, where)
        s = step_sample(
            tokenizer, row["prompt"], row["completions"], labels, seps, where, row.get("final", "")
        )
        if len(s.input_ids) > cfg.max_len:
            dropped += 1
            continue
        s.group = json.dumps(row["prompt"], sort_keys=True)
        samples.append(s)
    stats = _stats([len(s.input_ids) for s in samples], dropped, cfg.max_len)
    stats["steps"] = sum(sum(y >= 0 for y in s.step_labels) for s in samples)
    return samples, stats


def _pad(rows: Sequence[Sequence[float]], value: float, dtype: torch.dtype) -> torch.Tensor:
    width = max(len(r) for r in rows)
    out = torch.full((len(rows), width), value, dtype=dtype)
    for i, r in enumerate(rows):
        out[i, : len(r)] = torch.tensor(r, dtype=dtype)
    return out


def collate_groups(groups: Sequence[RankedGroup], pad_id: int) -> dict[str, torch.Tensor]:
    """input_ids, attention_mask (M, T) over all responses; group_index (B, K) row of each
    response in ranking order, -1 for padding; margin (B,)."""
    rows = [r for g in groups for r in g.responses]
    index, at = [], 0
    for g in groups:
        index.append(list(range(at, at + len(g.responses))))
        at += len(g.responses)
    ids = _pad(rows, pad_id, torch.long)
    mask = _pad([[1] * len(r) for r in rows], 0, torch.long)
    margin = torch.tensor([g.margin for g in groups], dtype=torch.float32)
    return {
        "input_ids": ids,
        "attention_mask": mask,
        "group_index": _pad(index, -1, torch.long),
        "margin": margin,
    }


def collate_steps(samples: Sequence[StepSample], pad_id: int) -> dict[str, torch.Tensor]:
    """input_ids, attention_mask, step_labels (B, T); step_labels -1 where no step ends."""
    ids = _pad([s.input_ids for s in samples], pad_id, torch.long)
    mask = _pad([[1] * len(s.input_ids) for s in samples], 0, torch.long)
    return {
        "input_ids": ids,
        "attention_mask": mask,
        "step_labels": _pad([s.step_labels for s in samples], -1.0, torch.float32),
    }


class ExamplePlan:
    """Deterministic length-bucketed batches per epoch (epoch e depends only on (seed, e)).

    items: groups or step samples; lengths: their padded cost; collate(list, pad_id) -> batch.
    """

    def __init__(
        self, items: list, lengths: list[int], batch_size: int, collate: Callable, pad_id: int, seed: int
    ):
        if not items:
            raise ConfigError("no training examples", fix="check data.train")
        self.items, self.lengths, self.batch_size = items, lengths, batch_size
        self.collate, self.pad_id, self.seed = collate, pad_id, seed
        self._cache: dict[int, list] = {}

    def epoch(self, e: int) -> list[dict[str, torch.Tensor]]:
        if e not in self._cache:
            seed = self.seed * 1000003 + e
            batches = bucket_batches(self.lengths, self.batch_size, seed=seed)
            self._cache = {e: [self.collate([self.items[i] for i in b], self.pad_id) for b in batches]}
        return self._cache[e]

    def __len__(self) -> int:
        return len(self.epoch(0))
