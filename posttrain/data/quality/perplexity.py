"""Perplexity filter: drop records a reference model finds implausible (step 7 of data clean).

A record's perplexity is that of its *response tokens* under the reference model, rendered as
SFT renders it (`posttrain.data.render.render_records`, chat template, ``train_on:
assistant``): every assistant turn of a chat record, the completion of a prompt/completion
record, the chosen response of a preference record (prompt + chosen as a prompt/completion).
With nll_r the summed negative log-likelihood of those tokens and n_r their count (every
sample of the record together, cut to ``max_len`` tokens),

    ppl_r = exp(nll_r / n_r).

Threshold (`perplexity_keep`, the same function the preference trainer's ``filter:`` uses on
its pairs): ``min(max_ppl, the percentile-th percentile of every scored record's ppl)``
(linear interpolation, as `torch.quantile`); a record above it is dropped (rule
``perplexity``, evidence: its perplexity, tokens, the threshold and the percentile). A record
with no scored token (e.g. all cut by max_len) is kept and not counted in the percentile.

A percentile needs every score before the first decision: the step spools its items to a
temporary file (pickle) while it scores them in batches, holding one float per record, then
replays them. Prompt and ranking records have no single response to score: a `DataError`.
"""

from __future__ import annotations

import math
import pickle
import tempfile
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

from posttrain.data.quality.items import Item, chunks
from posttrain.errors import ConfigError, DataError, PosttrainError

Scorer = Callable[[list[Item]], list[tuple[float, int] | None]]
"""items -> per item ``(perplexity, scored tokens)`` or None when nothing of it is scored."""


@dataclass
class PerplexityCleanConfig:
    """The perplexity filter of `posttrain data clean` (off while ``model`` is empty)."""

    model: str = ""
    """Reference model folder, or ``default`` for the embedded default model; empty: the step is off."""
    percentile: float | None = None
    """Drop records whose perplexity is above this percentile (0-100, exclusive) of all scored records."""
    max_ppl: float | None = None
    """Drop records whose perplexity is above this value (with percentile: the lower threshold wins)."""
    max_len: int = 512
    """Tokens per rendered sample scored (the tail of longer ones is cut)."""
    batch_size: int = 16
    """Samples per forward pass."""

    @property
    def enabled(self) -> bool:
        return bool(self.model)

    def validate(self) -> None:
        if not self.enabled:
            return
        if self.percentile is None and self.max_ppl is None:
            raise ConfigError(
                "perplexity.model is set but no threshold",
                where="perplexity.percentile",
                fix="set perplexity.percentile (e.g. 95) or perplexity.max_ppl",
            )
        if self.percentile is not None and not 0 < self.percentile < 100:
            raise ConfigError(
                f"perplexity.percentile must be in (0, 100), got {self.percentile}",
                where="perplexity.percentile",
            )
        if self.max_ppl is not None and self.max_ppl <= 1:
            raise ConfigError(
                f"perplexity.max_ppl must be > 1, got {self.max_ppl}", where="perplexity.max_ppl"
            )
        if self.max_len < 2 or self.batch_size < 1:
            raise ConfigError(
                "perplexity.max_len must be >= 2 and batch_size >= 1", where="perplexity.max_len"
            )


def perplexity_keep(
    ppl: torch.Tensor, checked: torch.Tensor, max_ppl: float | None, percentile: float | None
) -> tuple[torch.Tensor, float]:
    """Which rows to keep: none of their checked perplexities above the threshold.

    ppl, checked: (N, k) perplexities and which of them are checked (bool); k = 1 for records,
    k = 2 for preference pairs (chosen, rejected).
    threshold = min(max_ppl, the `percentile`-th percentile of the checked perplexities).
    Returns (keep (N,) bool, threshold).
    """
    import torch

    threshold = float("inf") if max_ppl is None else float(max_ppl)
    if percentile is not None and checked.any():
        threshold = min(threshold, float(torch.quantile(ppl[checked].double(), percentile / 100)))
    return ~((ppl > threshold) & checked).any(dim=1), threshold


def response_record(item: Item):
    """The item as a `Record` the SFT renderer reads (preference: prompt + chosen)."""
    from posttrain.data.loaders import Record

    if item.kind in ("chat", "prompt_completion"):
        return Record(item.data, item.where, item.kind)
    if item.kind == "preference":
        data = {"prompt": item.data["prompt"], "completion": item.data["chosen"]}
        return Record(data, item.where, "prompt_completion")
    raise DataError(
        f"the perplexity filter scores responses; {item.kind} records have no single response",
        where=item.where,
        fix="clean chat, prompt/completion or preference records with perplexity.model, or unset it",
    )


def model_scorer(cfg: PerplexityCleanConfig) -> Scorer:
    """Score items under the reference model ``cfg.model`` (batched forward passes)."""
    from posttrain.data.render import render_records, truncate
    from posttrain.eval.perplexity import sample_nll, scored
    from posttrain.models.load import load_model, load_tokenizer
    from posttrain.train.loop import resolve_model_path

    try:
        folder = resolve_model_path(cfg.model)
        tokenizer = load_tokenizer(folder)
        model = load_model(folder, tokenizer=tokenizer)
    except PosttrainError as exc:
        raise type(exc)(exc.message, where=f"perplexity.model ({cfg.model})", fix=exc.fix) from exc
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0

    def score(items: list[Item]) -> list[tuple[float, int] | None]:
        records = [response_record(it) for it in items]
        samples, _ = truncate(render_records(tokenizer, records), cfg.max_len, "truncate")
        samples = [s for s in samples if scored(s) > 0]
        nll, tokens = sample_nll(model, samples, pad, cfg.batch_size)
        sums: dict[str, list[float]] = {}
        for s, a, b in zip(samples, nll, tokens, strict=True):
            acc = sums.setdefault(s.where, [0.0, 0])
            acc[0], acc[1] = acc[0] + a, acc[1] + b
        out: list[tuple[float, int] | None] = []
        for it in items:
            acc = sums.get(it.where)
            out.append((math.exp(acc[0] / acc[1]), int(acc[1])) if acc and acc[1] else None)
        return out

    return score


def _mark(item: Item, ppl: float, n: int, threshold: float, cfg: PerplexityCleanConfig) -> None:
    if ppl > threshold:
        item.drop("perplexity", perplexity=round(ppl, 4), tokens=n, threshold=round(threshold, 4),
                  percentile=cfg.percentile, max_ppl=cfg.max_ppl)  # fmt: skip


def perplexity_filter(
    items: Iterable[Item], cfg: PerplexityCleanConfig, score: Scorer | None = None, batch: int = 256
) -> Iterator[Item]:
    """Drop items above the perplexity threshold (module docstring); ``score`` defaults to
    `model_scorer`. Items keep their order; removed items pass through untouched."""
    score = model_scorer(cfg) if score is None else score
    if cfg.percentile is None:  # a fixed threshold: decide batch by batch
        for group in chunks(items, batch):
            alive = [it for it in group if it.removed is None]
            for item, found in zip(alive, score(alive) if alive else [], strict=True):
                if found is not None:
                    _mark(item, *found, cfg.max_ppl, cfg)
            yield from group
        return
    with tempfile.TemporaryFile() as spool:
        values: list[float] = []
        for group in chunks(items, batch):
            alive = [it for it in group if it.removed is None]
            found = score(alive) if alive else []
            values += [f[0] for f in found if f is not None]
            pickle.dump((group, found), spool, protocol=pickle.HIGHEST_PROTOCOL)
        import torch

        ppl = torch.tensor(values, dtype=torch.float64).unsqueeze(1)
        _, threshold = perplexity_keep(
            ppl, torch.ones_like(ppl, dtype=torch.bool), cfg.max_ppl, cfg.percentile
        )
        spool.seek(0)
        while True:
            try:
                group, found = pickle.load(spool)
            except EOFError:
                break
            alive = [it for it in group if it.removed is None]
            for item, f in zip(alive, found, strict=True):
                if f is not None:
                    _mark(item, *f, threshold, cfg)
            yield from group
