"""Perplexity of a model on a text or chat set, masked exactly like SFT.

Chat and prompt/completion records are rendered by the SFT renderer
(`posttrain.data.render.render_records`, same chat template, same ``train_on`` mask, same
truncation), so the tokens that count are the tokens SFT would train on; ``text`` records
(``{"text": ...}``) count every token after the first. ``path: tasks`` is the task suite's
held-out chain-of-thought chats (the SFT eval set).

For sample i with scored tokens t in S_i, nll_i = -sum_{t in S_i} log p(x_t | x_<t) and
n_i = |S_i|. The reported numbers are token-weighted, as SFT's eval loss:

    nll_per_token = sum_i nll_i / sum_i n_i,    perplexity = exp(nll_per_token).

Their 95% intervals come from a percentile bootstrap over samples (resample samples with
replacement, recompute the ratio), `ratio_bootstrap`. Samples with no scored token are dropped
(and counted).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import torch

from posttrain.errors import ConfigError, DataError


@dataclass
class PerplexityConfig:
    """One text or chat set whose perplexity is reported."""

    path: str = "tasks"
    """JSONL / JSON / Parquet file or ``save_to_disk`` folder of chat, prompt/completion or
    text records; ``tasks``: the task suite's held-out chats (``tasks``, ``n_per_level``)."""
    name: str = ""
    """Label in results.json (``perplexity/<name>``; default: the file's stem, or ``tasks``)."""
    train_on: Literal["assistant", "all", "last"] = "assistant"
    """Which chat turns are scored, as SFT's ``data.train_on``."""
    max_len: int = 512
    """Samples longer than this many tokens are truncated or dropped (see truncation)."""
    truncation: Literal["drop", "truncate"] = "truncate"
    """What to do with an over-long sample, as SFT's ``data.truncation``."""
    limit: int | None = None
    """At most this many records (None: all)."""
    tasks: list[str] | None = None
    """Task names for ``path: tasks`` (None: arith, countdown, sort)."""
    n_per_level: int = 10
    """Task-suite held-out problems per task and level."""
    batch_size: int = 16
    """Samples per forward pass."""

    def label(self) -> str:
        if self.name:
            return self.name
        from pathlib import Path

        name = Path(self.path).name
        for suffix in (".jsonl", ".json", ".parquet"):
            name = name.removesuffix(suffix)
        return name


def ratio_bootstrap(
    num: np.ndarray, den: np.ndarray, n_boot: int = 1000, level: float = 0.95, seed: int = 0
) -> tuple[float, float]:
    """Percentile bootstrap interval of ``sum(num) / sum(den)``, resampling the paired rows."""
    num, den = np.asarray(num, dtype=float), np.asarray(den, dtype=float)
    if num.size == 0:
        return float("nan"), float("nan")
    idx = np.random.default_rng(seed).integers(0, num.size, size=(n_boot, num.size))
    ratios = num[idx].sum(1) / np.maximum(den[idx].sum(1), 1e-12)
    lo, hi = np.quantile(ratios, [(1 - level) / 2, (1 + level) / 2])
    return float(lo), float(hi)


def perplexity_metrics(
    nll: list[float], tokens: list[int], n_boot: int = 1000, seed: int = 0
) -> dict[str, dict[str, float]]:
    """``{"nll_per_token", "perplexity", "tokens"}`` each as ``{"value", "ci_low", "ci_high", "n"}``
    (module docstring); ``n`` is the number of samples."""
    num, den = np.asarray(nll, dtype=float), np.asarray(tokens, dtype=float)
    mean = float(num.sum() / den.sum()) if den.sum() > 0 else float("nan")
    lo, hi = ratio_bootstrap(num, den, n_boot, seed=seed)
    n = len(nll)
    tok = float(den.sum())
    return {
        "nll_per_token": {"value": mean, "ci_low": lo, "ci_high": hi, "n": n},
        "perplexity": {"value": math.exp(mean), "ci_low": math.exp(lo), "ci_high": math.exp(hi), "n": n},
        "tokens": {"value": tok, "ci_low": tok, "ci_high": tok, "n": n},
    }


def load_samples(cfg: PerplexityConfig, tokenizer: Any) -> list:
    """The set's samples (`posttrain.data.render.Sample`): SFT-rendered chats, or text records."""
    from posttrain.data.render import Sample, render_records, truncate
    from posttrain.data.sft_data import DataConfig, task_records

    if cfg.path == "tasks":
        from posttrain.data.sft_data import resolve_step_sep

        dc = DataConfig(n_per_level=cfg.n_per_level)
        if cfg.tasks is not None:
            dc.tasks = list(cfg.tasks)
        records = task_records(dc, "test", cfg.n_per_level, resolve_step_sep(tokenizer, "auto"))[: cfg.limit]
    else:
        texts = text_rows(cfg.path, cfg.limit)
        if texts is not None:
            samples = []
            for text, where in texts:
                ids = list(tokenizer(text, add_special_tokens=False)["input_ids"])
                samples.append(Sample(ids, [-100, *ids[1:]], where))
            samples, _ = truncate(samples, cfg.max_len, cfg.truncation)
            return [s for s in samples if scored(s) > 0]
        from posttrain.data.loaders import load_records

        records = load_records(cfg.path, limit=cfg.limit)
    if not records:
        raise DataError(
            f"no records in {cfg.path}", where="perplexity.path", fix="point it at a non-empty file"
        )
    if records[0].kind not in ("chat", "prompt_completion"):
        raise DataError(
            f"perplexity reads chat, prompt/completion or text records, not {records[0].kind!r}",
            where=records[0].where,
            fix='write {"messages": [...]}, {"prompt", "completion"} or {"text": ...} per row',
        )
    samples = render_records(tokenizer, records, train_on=cfg.train_on)
    samples, _ = truncate(samples, cfg.max_len, cfg.truncation)
    return [s for s in samples if scored(s) > 0]


def scored(sample: Any) -> int:
    """Tokens of a sample that count: labelled ones after the first (nothing predicts token 0)."""
    return sum(label != -100 for label in sample.labels[1:])


def text_rows(path: str, limit: int | None) -> list[tuple[str, str]] | None:
    """``(text, "file:line")`` of a JSONL file of ``{"text": ...}`` rows; None when the file's
    first row is not a text record (then it is read as chat / prompt-completion records)."""
    from pathlib import Path

    from posttrain.data.loaders import jsonl_lines

    if not path.endswith((".jsonl", ".jsonl.gz")) or not Path(path).is_file():
        return None
    out: list[tuple[str, str]] = []
    for row, where, error in jsonl_lines(Path(path)):
        if error is not None:
            raise error
        if not out and (
            not isinstance(row, dict) or "text" not in row or "messages" in row or "prompt" in row
        ):
            return None
        if not isinstance(row, dict) or not isinstance(row.get("text"), str):
            raise DataError("a text record needs a string 'text' field", where=where,
                            fix="keep one record kind per file")  # fmt: skip
        out.append((row["text"], where))
        if limit is not None and len(out) >= limit:
            break
    return out


@torch.no_grad()
def sample_nll(model: Any, samples: list, pad_id: int, batch_size: int = 16) -> tuple[list[float], list[int]]:
    """Per sample: (summed NLL of its scored tokens, their count), through the training loss path
    (`posttrain.train.lm_loss.sequence_logprobs` on right-padded batches)."""
    from posttrain.data.collate import pad_collate
    from posttrain.train.lm_loss import sequence_logprobs

    if batch_size < 1:
        raise ConfigError(f"batch_size must be >= 1, got {batch_size}", where="perplexity.batch_size")
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    nll, tokens = [], []
    try:
        for s in range(0, len(samples), batch_size):
            batch = pad_collate(samples[s : s + batch_size], pad_id)
            sums, counts = sequence_logprobs(model, {k: v.to(device) for k, v in batch.items()})
            nll += (-sums.double()).tolist()
            tokens += counts.tolist()
    finally:
        model.train(was_training)
    return nll, tokens


def evaluate_perplexity(
    cfg: PerplexityConfig, model: Any, tokenizer: Any, n_boot: int = 1000, seed: int = 0
) -> tuple[dict[str, dict], list[dict]]:
    """``(metrics, rows)``: `perplexity_metrics` of the set and one row per sample
    (``where``, ``nll``, ``tokens``)."""
    samples = load_samples(cfg, tokenizer)
    if not samples:
        raise DataError(f"no sample of {cfg.path} has a scored token", where="perplexity.train_on",
                        fix="score more turns (train_on: all) or check the records")  # fmt: skip
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    nll, tokens = sample_nll(model, samples, pad, cfg.batch_size)
    rows = [{"where": s.where, "nll": a, "tokens": b} for s, a, b in zip(samples, nll, tokens, strict=True)]
    return perplexity_metrics(nll, tokens, n_boot, seed), rows
