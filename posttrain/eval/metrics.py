"""Evaluation metrics as pure functions over per-problem samples (no model, no I/O).

Every reported number is a mean over problems of a per-problem value, so each gets the same
bootstrap interval (`bootstrap_ci`): resample the problems with replacement, recompute the mean,
take the 2.5% and 97.5% percentiles. The per-problem values are:

- accuracy: the fraction of the problem's samples that are correct (greedy: 0 or 1);
- pass@k: `pass_at_k` (Chen et al. 2021, unbiased, k <= n);
- maj@k: `maj_at_k` (the majority answer of the first k samples is correct, 0 or 1);
- mean reward: the mean score of the problem's samples;
- response length: the mean generated tokens of the problem's samples;
- tokens per problem: all tokens generated for the problem (samples, search probes).
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Sequence
from typing import Any

import numpy as np

from posttrain.errors import ConfigError


def accuracy(correct: Sequence[bool | float]) -> float:
    """Fraction correct: ``sum(correct) / len(correct)``; NaN for no samples."""
    return float(np.mean(np.asarray(correct, dtype=float))) if len(correct) else float("nan")


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k of one problem with ``c`` correct among ``n`` samples (Chen et al. 2021).

    pass@k = 1 - C(n - c, k) / C(n, k), the probability that k samples drawn without
    replacement from the n include a correct one. Computed in the numerically stable
    product form 1 - prod_{i = n - c + 1}^{n} (1 - k / i) (no large binomials); it is 1 when
    n - c < k. Not the biased 1 - (1 - c/n)^k, which draws with replacement and
    underestimates pass@k for k > 1. ``k > n`` (or k < 1, c outside 0..n) is a ConfigError.
    """
    if not 1 <= k <= n:
        raise ConfigError(
            f"pass@{k} needs 1 <= k <= n, but n = {n} samples",
            where="k",
            fix=f"draw at least {k} samples per problem (n: {k}) or ask for k <= {n}",
        )
    if not 0 <= c <= n:
        raise ConfigError(f"pass@k got c = {c} correct of n = {n}", where="k")
    if n - c < k:
        return 1.0
    return float(1.0 - np.prod(1.0 - k / np.arange(n - c + 1, n + 1, dtype=float)))


def maj_at_k(answers: Sequence[Hashable | None], correct: Sequence[bool], k: int) -> float:
    """1.0 if the majority answer of the first ``k`` samples is correct, else 0.0.

    ``answers[i]`` is sample i's extracted answer (None: no answer, which never votes);
    ``correct[i]`` whether sample i is correct. The majority answer is the most frequent
    one among the first k; a tie goes to the tied answer that appears first (lowest sample
    index), a rule that does not look at correctness. The answer's correctness is that of
    its first sample. No answer at all scores 0. The first k of n i.i.d. samples are a
    uniform draw, so averaging over problems estimates maj@k. ``k > len(answers)`` is a
    ConfigError.
    """
    if not 1 <= k <= len(answers):
        raise ConfigError(
            f"maj@{k} needs 1 <= k <= n, but n = {len(answers)} samples",
            where="k",
            fix=f"draw at least {k} samples per problem or ask for a smaller k",
        )
    counts: dict[Hashable, int] = {}
    first: dict[Hashable, int] = {}
    for i, a in enumerate(answers[:k]):
        if a is not None:
            counts[a] = counts.get(a, 0) + 1
            first.setdefault(a, i)
    if not counts:
        return 0.0
    best = max(counts, key=lambda a: (counts[a], -first[a]))
    return float(bool(correct[first[best]]))


def bootstrap_ci(
    values: Sequence[float], n_boot: int = 1000, level: float = 0.95, seed: int = 0
) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean of ``values``.

    Draws ``n_boot`` resamples of the values with replacement (one (n_boot, n) index matrix
    from ``numpy.random.default_rng(seed)``), takes each resample's mean and returns the
    (1 - level)/2 and (1 + level)/2 quantiles. NaN, NaN for no values.
    """
    x = np.asarray(values, dtype=float)
    if x.size == 0:
        return float("nan"), float("nan")
    idx = np.random.default_rng(seed).integers(0, x.size, size=(n_boot, x.size))
    means = x[idx].mean(axis=1)
    lo, hi = np.quantile(means, [(1 - level) / 2, (1 + level) / 2])
    return float(lo), float(hi)


def mean_with_ci(values: Sequence[float], n_boot: int = 1000, seed: int = 0) -> dict[str, float]:
    """``{"value", "ci_low", "ci_high", "n"}``: the mean and its bootstrap 95% interval."""
    lo, hi = bootstrap_ci(values, n_boot=n_boot, seed=seed)
    mean = float(np.mean(values)) if len(values) else float("nan")
    return {"value": mean, "ci_low": lo, "ci_high": hi, "n": len(values)}


def response_length(token_counts: Sequence[int]) -> float:
    """Mean generated tokens per sample of one problem: ``sum(token_counts) / n``."""
    return float(np.mean(token_counts)) if len(token_counts) else float("nan")


def tokens_per_problem(token_counts: Sequence[int], extra_tokens: int = 0) -> float:
    """Every token generated for one problem: its samples' tokens plus ``extra_tokens``
    (what a search strategy spent beyond the returned sample: other branches, probes)."""
    return float(sum(token_counts) + extra_tokens)


def problem_values(
    correct: Sequence[bool],
    scores: Sequence[float],
    tokens: Sequence[int],
    answers: Sequence[Hashable | None],
    ks: Sequence[int],
    extra_tokens: int = 0,
) -> dict[str, float]:
    """One problem's per-problem metric values (module docstring), keyed as reported.

    ``pass@k`` for every k in ``ks``; ``maj@k`` too when some sample has an answer."""
    out = {
        "accuracy": accuracy(correct),
        "mean_reward": float(np.mean(scores)),
        "response_length": response_length(tokens),
        "tokens_per_problem": tokens_per_problem(tokens, extra_tokens),
    }
    n, c = len(correct), int(sum(bool(x) for x in correct))
    for k in ks:
        out[f"pass@{k}"] = pass_at_k(n, c, k)
    if any(a is not None for a in answers):
        for k in ks:
            out[f"maj@{k}"] = maj_at_k(answers, correct, k)
    return out


def summarize(rows: Sequence[dict[str, float]], n_boot: int = 1000, seed: int = 0) -> dict[str, dict]:
    """Mean and bootstrap interval of every metric key over per-problem value dicts.

    A key missing from some rows (maj@k where a problem has no answers) is averaged over
    the rows that have it; ``n`` says how many."""
    keys: list[str] = []
    for r in rows:
        keys += [k for k in r if k not in keys]
    return {k: mean_with_ci([r[k] for r in rows if k in r], n_boot, seed) for k in keys}


def breakdown(
    items: Sequence[Any],
    key: Callable[[Any], Hashable | Sequence[Hashable] | None],
    values: Callable[[Any], dict[str, float]],
    n_boot: int = 1000,
    seed: int = 0,
) -> dict[str, dict[str, dict]]:
    """`summarize` per group: ``key(item)`` names the item's group (a list or tuple of names
    puts it in several, e.g. tags; None in none); groups sorted by name."""
    groups: dict[str, list[dict[str, float]]] = {}
    for item in items:
        names = key(item)
        if names is None:
            continue
        for name in names if isinstance(names, list | tuple) else [names]:
            groups.setdefault(str(name), []).append(values(item))
    return {g: summarize(groups[g], n_boot, seed) for g in sorted(groups)}
