"""The generation half of an online-RL step: sampling settings, dynamic sampling, rollout metrics."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import torch

from posttrain.errors import ConfigError
from posttrain.train.rl_data import PromptSampler, RewardSet, Scored


@dataclass
class RolloutConfig:
    """Generation: how many prompts and samples per step, and how they are sampled."""

    backend: str = "hf"
    """hf (the policy module itself samples) | vllm (CUDA, `[gpu]` extra) | a registered backend."""
    prompts_per_step: int = 8
    """Groups per step (after dynamic sampling)."""
    n: int = 8
    """Completions per prompt (the group)."""
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    max_new_tokens: int = 128
    stop: list[str] = field(default_factory=list)
    """Stop strings (kept in the completion)."""
    max_batch_rows: int = 256
    """Rows decoded together by the hf engine."""
    dynamic_sampling: bool = False
    """DAPO: drop groups whose rewards are all equal and sample more prompts to refill."""
    max_refill_rounds: int = 3
    """Extra generate rounds (each a full prompts_per_step batch) for dynamic sampling."""
    overlong_filter: bool = False
    """DAPO overlong filtering: completions cut by max_new_tokens get no loss."""
    overlong_buffer: int | None = None
    """Buffer of the `overlong` reward term (DAPO soft punishment); null = max_new_tokens // 4."""

    def validate(self) -> None:
        if self.n < 1 or self.prompts_per_step < 1 or self.max_refill_rounds < 0:
            raise ConfigError("n, prompts_per_step >= 1 and max_refill_rounds >= 0", where="rollout")
        if self.temperature <= 0:
            raise ConfigError(
                "RL samples from the policy: temperature must be > 0", where="rollout.temperature"
            )


def rollout_seed(seed: int, step: int, round_: int) -> int:
    """The engine's sampling seed for (recipe seed, step, refill round): resume replays it."""
    return (seed * 1_000_003 + step * 1_009 + round_) % (2**62)


def sampling_params(cfg: RolloutConfig):
    from posttrain.rollout.sampling import rollout_defaults

    return rollout_defaults(
        n=cfg.n, temperature=cfg.temperature, top_p=cfg.top_p, top_k=cfg.top_k,
        max_new_tokens=cfg.max_new_tokens, stop=list(cfg.stop),
    )  # fmt: skip


def generate_groups(
    engine: Any, sampler: PromptSampler, rewards: RewardSet, ro: RolloutConfig, seed: int, step: int
) -> tuple[list[Scored], list[Scored], dict[str, float]]:
    """Sample ``ro.n`` completions of ``ro.prompts_per_step`` prompts and score them.

    Dynamic sampling (DAPO): groups whose rewards are all equal carry no group-relative signal;
    they are dropped and another full batch of prompts is generated, at most
    ``max_refill_rounds`` times; the first ``prompts_per_step`` kept groups are returned (fewer
    if the rounds run out). Returns (kept groups, every generated group, timings).
    """
    params = sampling_params(ro)
    kept: list[Scored] = []
    seen: list[Scored] = []
    times = {"time/generate_s": 0.0, "time/reward_s": 0.0, "rollout/rounds": 0}
    for round_ in range(1 + (ro.max_refill_rounds if ro.dynamic_sampling else 0)):
        records = sampler.take(ro.prompts_per_step)
        t0 = time.perf_counter()
        completions = engine.generate(records, params.replace(seed=rollout_seed(seed, step, round_)))
        t1 = time.perf_counter()
        rows = [records[c.prompt_index] for c in completions]
        outcome, steps, parts = rewards.score(rows, completions)
        times["time/generate_s"] += t1 - t0
        times["time/reward_s"] += time.perf_counter() - t1
        times["rollout/rounds"] += 1
        for g, rec in enumerate(records):
            sl = slice(g * ro.n, (g + 1) * ro.n)
            seen.append(Scored(rec, completions[sl], outcome[sl], steps[sl], parts[sl]))
            if not (ro.dynamic_sampling and seen[-1].zero_variance()):
                kept.append(seen[-1])
        if len(kept) >= ro.prompts_per_step:
            break
    return kept[: ro.prompts_per_step], seen, times


def rollout_metrics(seen: list[Scored], kept: list[Scored]) -> dict[str, float]:
    """Reward per term, lengths, clipped ratio and zero-variance groups over every generated group."""
    comps = [c for g in seen for c in g.completions]
    lengths = torch.tensor([len(c.token_ids) for c in comps], dtype=torch.float)
    totals = torch.tensor([t for g in seen for t in g.totals()])
    out = {
        "reward/total_mean": float(totals.mean()),
        "reward/total_std": float(totals.std()) if totals.numel() > 1 else 0.0,
        "response/length_mean": float(lengths.mean()),
        "response/length_max": float(lengths.max()),
        "response/clipped_ratio": sum(c.finish_reason == "length" for c in comps) / len(comps),
        "rollout/zero_variance_frac": sum(g.zero_variance() for g in seen) / len(seen),
        "rollout/groups_kept": len(kept),
    }
    for label in seen[0].parts[0]:
        vals = torch.tensor([p[label] for g in seen for p in g.parts])
        out[f"reward/{label}_mean"] = float(vals.nanmean())
        out[f"reward/{label}_std"] = float(vals[~vals.isnan()].std()) if (~vals.isnan()).sum() > 1 else 0.0
    return out
