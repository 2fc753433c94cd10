"""Trained reward models as reward functions (batched): outcome RM and process RM scorers.

`ModelScorer(path)` loads a folder written by `posttrain rm` / `posttrain prm`
(`posttrain.models.heads.load_reward_model`) and is a reward function
``scorer(prompts, completions, metadata) -> list[RewardResult]``:

- outcome RM (``kind: orm``): score = r(x, y), the head's raw value at the last token of the
  rendered ``prompt + completion`` (unbounded; the Bradley-Terry scale).
- process RM (``kind: prm``): the completion is read as written; each step-end token (the
  separator, and the token ending the last step, e.g. ``</think>``) gives
  p_k = sigmoid(z_k) = P(step k correct), and the score aggregates them: ``min`` (a chain
  is as good as its worst step), ``last``, ``mean`` or ``product``. A completion with no
  scored step gets 0.0. ``info["steps"]`` holds every p_k.

Registered rewards (for prompt records / `score_batch`): ``rm`` and ``prm`` read the model
folder from ``metadata["reward_model"]`` (``prm`` also ``metadata["prm_agg"]``, default
min); loaded models are cached. For a fixed model, register a scorer under your own name:
``register_reward("my_rm")(ModelScorer("runs/rm/final"))``.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from typing import Any

import torch

from posttrain.data.collate import IGNORE_INDEX, pad_collate
from posttrain.data.render import Sample, render_prompt_completion
from posttrain.errors import ConfigError, DataError
from posttrain.models.heads import last_token_values, load_reward_model, single_token_id, step_end_mask
from posttrain.rewards.registry import RewardResult

AGGREGATIONS = ("min", "last", "mean", "product")


def aggregate_steps(probs: Sequence[float], how: str) -> float:
    """Combine per-step P(correct) into one score: min | last | mean | product (0.0 if no steps)."""
    if how not in AGGREGATIONS:
        raise ConfigError(
            f"unknown PRM aggregation {how!r}", where="prm_agg", fix=f"use one of {', '.join(AGGREGATIONS)}"
        )
    if not probs:
        return 0.0
    if how == "min":
        return min(probs)
    if how == "last":
        return probs[-1]
    if how == "mean":
        return sum(probs) / len(probs)
    return math.prod(probs)


class ModelScorer:
    """A saved outcome or process reward model, usable as a batched reward function."""

    def __init__(
        self, path: str, agg: str = "min", batch_size: int = 16, device: str = "auto", dtype: str = "auto"
    ):
        aggregate_steps([], agg)  # validate the name now
        self.model, self.tokenizer = load_reward_model(path, dtype=dtype, device=device)
        self.kind, self.agg, self.batch_size = self.model.info.get("kind", "orm"), agg, batch_size
        self.device = next(self.model.parameters()).device
        self.seps = None
        if self.kind == "prm":
            info = self.model.info
            end = info.get("last_step_end", "")
            end_id = single_token_id(self.tokenizer, end, "last_step_end") if end else None
            self.seps = (single_token_id(self.tokenizer, info["step_sep"], "step_sep"), end_id)

    def _sample(self, prompt: Any, completion: str) -> tuple[list[int], int] | None:
        eos = self.tokenizer.eos_token or ""
        text = completion.strip()
        text = text.removesuffix(eos).rstrip() if eos else text
        if not text:
            return None
        s = render_prompt_completion(self.tokenizer, prompt, text)
        return s.input_ids, next(i for i, y in enumerate(s.labels) if y != IGNORE_INDEX)

    @torch.no_grad()
    def _score_batch(self, rows: list[tuple[list[int], int]], agg: str) -> list[tuple[float, list[float]]]:
        batch = pad_collate([Sample(ids, ids) for ids, _ in rows], self.tokenizer.pad_token_id)
        ids, mask = batch["input_ids"].to(self.device), batch["attention_mask"].to(self.device)
        values = self.model(ids, mask).float()
        if self.kind != "prm":
            return [(float(v), []) for v in last_token_values(values, mask)]
        start = torch.tensor([s for _, s in rows], device=self.device)
        at = step_end_mask(ids, start, *self.seps)
        out = []
        for row in range(len(rows)):
            probs = torch.sigmoid(values[row][at[row]]).tolist()
            out.append((aggregate_steps(probs, agg), probs))
        return out

    def __call__(
        self, prompts: list, completions: list[str], metadata: list[dict] | None = None
    ) -> list[RewardResult]:
        return self.score(prompts, completions, self.agg)

    def score(self, prompts: list, completions: list[str], agg: str) -> list[RewardResult]:
        """One result per completion; `agg` combines a PRM's step scores (ignored for an outcome RM)."""
        aggregate_steps([], agg)
        samples = [self._sample(p, c) for p, c in zip(prompts, completions, strict=True)]
        todo = [i for i, s in enumerate(samples) if s is not None]
        results = [RewardResult(0.0, {"why": "empty completion"})] * len(completions)
        for k in range(0, len(todo), self.batch_size):
            chunk = todo[k : k + self.batch_size]
            scored = self._score_batch([samples[i] for i in chunk], agg)
            for i, (score, steps) in zip(chunk, scored, strict=True):
                results[i] = RewardResult(score, self._info(score, steps, agg))
        return results

    def _info(self, score: float, steps: list[float], agg: str) -> dict[str, Any]:
        if self.kind != "prm":
            return {"why": f"reward model: {score:.3f}"}
        if not steps:
            return {"why": "no scored step", "steps": []}
        return {"why": f"{agg} over {len(steps)} steps: {score:.3f}", "steps": steps}


@functools.lru_cache(maxsize=4)
def cached_scorer(path: str) -> ModelScorer:
    """The `ModelScorer` of a model folder, loaded once per path."""
    return ModelScorer(path)


def _by_model(prompts: list, completions: list[str], metadata: list[dict], name: str, agg_key: str | None):
    groups: dict[tuple[str, str], list[int]] = {}
    for i, meta in enumerate(metadata):
        path = meta.get("reward_model") if isinstance(meta, dict) else None
        if not isinstance(path, str):
            raise DataError(
                f"the {name!r} reward needs the model folder in metadata 'reward_model'",
                where=f"metadata[{i}].reward_model",
                fix=f"set it, or register a fixed one: register_reward('my_{name}')(ModelScorer(PATH))",
            )
        groups.setdefault((path, meta.get(agg_key, "min") if agg_key else "min"), []).append(i)
    results: list[RewardResult | None] = [None] * len(completions)
    for (path, agg), rows in groups.items():
        out = cached_scorer(path).score([prompts[i] for i in rows], [completions[i] for i in rows], agg)
        for i, res in zip(rows, out, strict=True):
            results[i] = res
    return results


def rm_reward(prompts: list, completions: list[str], metadata: list[dict]) -> list[RewardResult]:
    """The outcome RM at ``metadata["reward_model"]``: r(x, y)."""
    return _by_model(prompts, completions, metadata, "rm", None)


def prm_reward(prompts: list, completions: list[str], metadata: list[dict]) -> list[RewardResult]:
    """The process RM at ``metadata["reward_model"]``, steps combined by ``metadata["prm_agg"]`` (min)."""
    return _by_model(prompts, completions, metadata, "prm", "prm_agg")
