"""From a data config to tokenised SFT samples and a deterministic batch plan."""

from __future__ import annotations

import logging
import random
from dataclasses import dataclass, field
from typing import Literal

import torch

from posttrain.data.collate import bucket_batches, pack, packed_collate, pad_collate
from posttrain.data.loaders import Record, load_records
from posttrain.data.render import Sample, render_records, summarize, truncate
from posttrain.errors import ConfigError, DataError

log = logging.getLogger(__name__)


@dataclass
class DataConfig:
    """Where SFT data comes from and how it becomes batches."""

    train: str = "tasks"
    """A JSONL / JSON / Parquet file or a saved HF dataset folder, or `tasks` for the embedded task suite."""
    eval: str | None = "tasks"
    """Held-out data in the same forms (`tasks` = the suite's test split); null disables eval loss."""
    tasks: list[str] = field(default_factory=lambda: ["arith", "countdown", "sort"])
    """Task names used when train/eval is `tasks`."""
    levels: list[int] | None = None
    """Difficulty levels to include (null = all levels of each task)."""
    n_per_level: int = 400
    """Training problems per task and level (tasks only)."""
    eval_n_per_level: int = 20
    """Held-out problems per task and level for eval loss (tasks only)."""
    step_sep: str = "auto"
    """Separator between reasoning steps in task data; `auto` = the tokenizer's `<step>` token if it has one, else a newline."""
    max_len: int = 512
    """Samples longer than this many tokens are truncated or dropped (see truncation)."""
    truncation: Literal["drop", "truncate"] = "drop"
    """What to do with an over-long sample; either way it is counted and reported."""
    train_on: Literal["assistant", "all", "last"] = "assistant"
    """Which turns carry loss: assistant turns, all turns, or only the last assistant turn."""
    packing: bool = True
    """Pack samples into rows of train.seq_len tokens (attention confined to each sample)."""
    limit: int | None = None
    """Use only the first N records of a file (quick experiments)."""
    seed: int = 0
    """Seed of the task-suite split."""

    def validate(self) -> None:
        if self.max_len < 1:
            raise ConfigError(f"max_len must be >= 1 token, got {self.max_len}", where="max_len",
                              fix="e.g. max_len: 512")  # fmt: skip
        if self.limit is not None and self.limit < 1:
            raise ConfigError(f"limit must be >= 1 or null, got {self.limit}", where="limit",
                              fix="drop it to use every record")  # fmt: skip


def resolve_step_sep(tokenizer, step_sep: str) -> str:
    if step_sep != "auto":
        return step_sep
    vocab = tokenizer.get_vocab()
    return "<step>" if "<step>" in vocab else "\n"


def task_records(cfg: DataConfig, split: str, n_per_level: int, step_sep: str) -> list[Record]:
    """Chat records of the task suite: question -> reasoning + answer."""
    from posttrain.data.tasks import make_split

    return [
        Record({"messages": p.messages(step_sep=step_sep)}, f"task:{name}/{split}/level{p.level}", "chat")
        for name in cfg.tasks
        for p in make_split(name, split, n_per_level, seed=cfg.seed, levels=cfg.levels)
    ]


def build_samples(tokenizer, cfg: DataConfig, split: Literal["train", "eval"]) -> tuple[list[Sample], dict]:
    """Load, validate, render and truncate one split; returns (samples, summary stats)."""
    source = cfg.train if split == "train" else cfg.eval
    if source is None:
        return [], {}
    step_sep = resolve_step_sep(tokenizer, cfg.step_sep)
    if source == "tasks":
        n = cfg.n_per_level if split == "train" else cfg.eval_n_per_level
        records = task_records(cfg, "train" if split == "train" else "test", n, step_sep)
    else:
        records = load_records(source, limit=cfg.limit)
    if not records:
        raise DataError(f"no records in {source}", fix="point data.train at a non-empty file")
    samples = render_records(tokenizer, records, train_on=cfg.train_on)
    samples, trunc_stats = truncate(samples, cfg.max_len, cfg.truncation)
    if not samples:
        raise DataError(
            f"every sample of {source} is longer than data.max_len={cfg.max_len} tokens and was dropped",
            fix="raise data.max_len or set data.truncation=truncate",
        )
    stats = summarize(samples, tokenizer)
    stats.update(trunc_stats)
    return samples, stats


class BatchPlan:
    """Deterministic micro-batches per epoch: epoch e's order depends only on (seed, e).

    Resuming at (epoch, index) therefore replays exactly the batches an
    uninterrupted run would have seen.
    """

    def __init__(
        self, samples: list[Sample], batch_size: int, seq_len: int, packing: bool, pad_id: int, seed: int
    ):
        if packing and any(len(s.input_ids) > seq_len for s in samples):
            longest = max(len(s.input_ids) for s in samples)
            raise ConfigError(
                f"train.seq_len={seq_len} is shorter than the longest sample ({longest} tokens)",
                fix="raise train.seq_len to at least data.max_len",
            )
        self.samples, self.batch_size, self.seq_len = samples, batch_size, seq_len
        self.packing, self.pad_id, self.seed = packing, pad_id, seed
        self._cache: dict[int, list] = {}

    def epoch(self, e: int) -> list[dict[str, torch.Tensor]]:
        if e not in self._cache:
            self._cache = {e: self._build(e)}
        return self._cache[e]

    def _build(self, e: int) -> list[dict[str, torch.Tensor]]:
        seed = self.seed * 1000003 + e
        if self.packing:
            order = list(range(len(self.samples)))
            random.Random(seed).shuffle(order)
            rows = pack([self.samples[i] for i in order], self.seq_len, seed=seed)
            random.Random(seed + 1).shuffle(rows)
            return [
                packed_collate(rows[i : i + self.batch_size], self.pad_id)
                for i in range(0, len(rows), self.batch_size)
            ]
        lengths = [len(s.input_ids) for s in self.samples]
        batches = bucket_batches(lengths, self.batch_size, seed=seed)
        return [pad_collate([self.samples[i] for i in b], self.pad_id) for b in batches]

    def __len__(self) -> int:
        return len(self.epoch(0))
