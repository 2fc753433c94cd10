"""Mixing: draw from several cleaned sources by ratios or token budgets, deterministically by seed.

Ratios (``inputs[i].ratio``): the mix has ``total`` records (default: the most the sources
allow without drawing any record twice), split in proportion to the ratios by largest
remainders, so the counts are exact to one record. Token budgets (``inputs[i].tokens``):
source i gives ``round(n_i * budget_i / T_i)`` records, n_i its records and T_i their tokens,
which is the budget in expectation. Either way each source's records are a uniform draw
without replacement made in one streaming pass (selection sampling, Knuth's Algorithm S:
keep the t-th of n with probability (k - kept) / (n - t)), from a random stream seeded by
``seed`` and the source's index, and the sources are interleaved smoothly (the next record
comes from the source furthest behind its share). Asking more than a source has is an error.
"""

from __future__ import annotations

import math
import random
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import TypeVar

from posttrain.errors import ConfigError, DataError

T = TypeVar("T")


@dataclass
class SourceConfig:
    """One input of a clean recipe."""

    path: str = ""
    """Data file (JSONL, JSON, Parquet), a dataset folder saved with save_to_disk, or tasks / task:NAME."""
    kind: str | None = None
    """Record kind (default: detected from the first record)."""
    split: str = "train"
    """Split of a dataset folder (or of the task suite)."""
    n_per_level: int = 200
    """Problems per level when path is ``tasks`` (the task suite) or ``task:NAME``."""
    seed: int = 0
    """Seed of the task suite's problems."""
    ratio: float | None = None
    """Share of the mix drawn from this source (mixing by ratios; set it on every input)."""
    tokens: int | None = None
    """Token budget drawn from this source (mixing by budgets; needs the recipe's tokenizer)."""


@dataclass
class MixConfig:
    """How the mix is drawn when the inputs have ratios or token budgets."""

    seed: int = 0
    """Seed of the draw: the same seed and inputs give the same mix."""
    total: int | None = None
    """Records in a ratio mix (default: as many as the sources allow)."""


def mix_mode(sources: list[SourceConfig]) -> str | None:
    """``ratio``, ``tokens`` or None (no mixing); a recipe setting both, or only some, is an error."""
    ratios = [s.ratio is not None for s in sources]
    budgets = [s.tokens is not None for s in sources]
    if any(ratios) and any(budgets):
        raise ConfigError(
            "inputs mix ratios and token budgets", where="inputs", fix="use one of ratio or tokens"
        )
    for flags, name in ((ratios, "ratio"), (budgets, "tokens")):
        if any(flags) and not all(flags):
            missing = flags.index(False)
            raise ConfigError(
                f"inputs[{missing}] has no {name} but other inputs do", where=f"inputs[{missing}].{name}"
            )
    return "ratio" if any(ratios) else "tokens" if any(budgets) else None


def ratio_counts(available: list[int], ratios: list[float], total: int | None = None) -> list[int]:
    """Records to draw per source: ``total`` split by ``ratios`` (largest remainders)."""
    for i, r in enumerate(ratios):
        if not math.isfinite(r) or r < 0:
            raise ConfigError(f"ratio must be a number >= 0, got {r}", where=f"inputs[{i}].ratio")
    weight = sum(ratios)
    if weight <= 0:
        raise ConfigError(
            f"the ratios sum to {weight:g}; they must sum to a positive number", where="inputs[*].ratio"
        )
    shares = [r / weight for r in ratios]
    if total is None:
        total = min(math.floor(n / p + 1e-9) for n, p in zip(available, shares, strict=True) if p > 0)
    if total < 0:
        raise ConfigError(f"mix.total must be >= 0, got {total}", where="mix.total")
    raw = [total * p for p in shares]
    counts = [math.floor(x) for x in raw]
    by_remainder = sorted(range(len(raw)), key=lambda i: counts[i] - raw[i])
    for i in by_remainder[: total - sum(counts)]:
        counts[i] += 1
    for i, (k, n) in enumerate(zip(counts, available, strict=True)):
        if k > n:
            raise DataError(
                f"the mix asks {k} records of inputs[{i}] but it has {n} after cleaning",
                where=f"inputs[{i}].ratio",
                fix="lower mix.total (or leave it unset) or this input's ratio",
            )
    return counts


def budget_counts(available: list[int], token_totals: list[int], budgets: list[int]) -> list[int]:
    """Records to draw per source for token budgets: ``round(n * budget / tokens)``."""
    counts = []
    for i, (n, have, want) in enumerate(zip(available, token_totals, budgets, strict=True)):
        if want < 0:
            raise ConfigError(f"token budget must be >= 0, got {want}", where=f"inputs[{i}].tokens")
        if want > have:
            raise DataError(
                f"token budget {want} is larger than inputs[{i}], which has {have} tokens after cleaning",
                where=f"inputs[{i}].tokens",
                fix=f"set inputs[{i}].tokens to at most {have}",
            )
        counts.append(round(n * want / have) if have else 0)
    return counts


def select(items: Iterable[T], n: int, k: int, rng: random.Random) -> Iterator[T]:
    """A uniform ``k`` of the ``n`` items, in order, in one pass (Algorithm S)."""
    if not 0 <= k <= n:
        raise ConfigError(f"cannot select {k} of {n} records", where="mix")
    kept = 0
    for t, item in enumerate(items):
        if kept == k:
            return
        if rng.random() * (n - t) < k - kept:
            kept += 1
            yield item


def interleave(streams: list[Iterator[T]], counts: list[int]) -> Iterator[T]:
    """Records of the streams (``counts[i]`` from stream i) with each source spread evenly."""
    done = [0] * len(streams)
    left = sum(counts)
    while left:
        i = min(
            (i for i, c in enumerate(counts) if done[i] < c), key=lambda i: ((done[i] + 1) / counts[i], i)
        )
        done[i] += 1
        left -= 1
        yield next(streams[i])


def mix(streams: list[Iterable[T]], available: list[int], counts: list[int], seed: int) -> Iterator[T]:
    """``counts[i]`` uniform draws from each stream (of ``available[i]`` items), interleaved."""
    drawn = [
        select(s, n, k, random.Random(f"posttrain-mix|{seed}|{i}"))
        for i, (s, n, k) in enumerate(zip(streams, available, counts, strict=True))
    ]
    return interleave([iter(d) for d in drawn], counts)
