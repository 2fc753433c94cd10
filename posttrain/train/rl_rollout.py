"""The generation half of an online-RL step: sampling settings, dynamic sampling, rollout metrics.

Multi-turn (``data.multi_turn``): `generate_conversations` samples ``n`` conversations per
prompt with an environment (`posttrain.rollout.multiturn`), `episode_batch` turns the kept
groups into trainer rows (one merged episode or one per turn) with each turn's credit.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Any, Literal

import torch

from posttrain.distributed.ray_rollout import RayConfig
from posttrain.errors import ConfigError
from posttrain.rollout.episodes import turn_credits
from posttrain.rollout.multiturn import (
    Conversation,
    ConversationEnv,
    EpisodeRow,
    conversation_episodes,
    conversation_return,
    rollout_conversations,
)
from posttrain.train.rl_data import MultiTurnConfig, PromptSampler, RewardSet, RewardTermConfig, Scored


@dataclass
class RolloutConfig:
    """Generation: how many prompts and samples per step, and how they are sampled."""

    backend: str = "hf"
    """hf (the policy module itself samples) | vllm (CUDA, `[gpu]` extra) | ray (rollout workers
    on a Ray cluster, `[ray]` extra; sized by `ray`) | a registered backend."""
    ray: RayConfig = field(default_factory=RayConfig)
    """With backend ray: rollout_workers, reward_workers, cpus_per_worker, address (`posttrain.distributed.ray_rollout`)."""
    lora_sync: Literal["merged", "adapter"] = "merged"
    """With backend vllm and a LoRA policy: send merged weights under the base names, or serve the
    adapter as a vLLM LoRA (base weights sent once; `posttrain.rollout.vllm_engine`)."""
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
    autocast: Literal["bfloat16", "float16"] | None = None
    """Sample under torch.autocast in this dtype whatever the trainer's precision (e.g. bf16 sampling
    with an fp32 update); the sampler's log-probs then differ from the trainer's, so old log-probs
    are recomputed and the gap is logged (mismatch/*); null = sample in train.precision."""
    dynamic_sampling: bool = False
    """DAPO: drop groups whose rewards are all equal and sample more prompts to refill."""
    max_refill_rounds: int = 3
    """Extra generate rounds (each a full prompts_per_step batch) for dynamic sampling."""
    overlong_filter: bool = False
    """DAPO overlong filtering: completions cut by max_new_tokens get no loss."""
    overlong_buffer: int | None = None
    """Buffer of the `overlong` reward term (DAPO soft punishment); null = max_new_tokens // 4."""

    def validate(self) -> None:
        self.ray.validate()
        if self.n < 1 or self.prompts_per_step < 1 or self.max_refill_rounds < 0:
            raise ConfigError("n, prompts_per_step >= 1 and max_refill_rounds >= 0", where="rollout")
        if self.temperature <= 0:
            raise ConfigError(
                "RL samples from the policy: temperature must be > 0", where="rollout.temperature"
            )


def rollout_seed(seed: int, step: int, round_: int) -> int:
    """The engine's sampling seed for (recipe seed, step, refill round): resume replays it."""
    return (seed * 1_000_003 + step * 1_009 + round_) % (2**62)


def sampling_context(engine: Any, ro: RolloutConfig):
    """torch.autocast around the engine's generate call when ``ro.autocast`` is set, else a no-op."""
    if ro.autocast is None:
        return nullcontext()
    device = getattr(engine, "device", torch.device("cpu"))
    return torch.autocast(torch.device(device).type, dtype=getattr(torch, ro.autocast))


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
    times = {"time/generate_s": 0.0, "time/reward_s": 0.0}

    def one_round(records: list[dict], round_: int) -> list[tuple[Scored, bool]]:
        t0 = time.perf_counter()
        with sampling_context(engine, ro):
            completions = engine.generate(records, params.replace(seed=rollout_seed(seed, step, round_)))
        t1 = time.perf_counter()
        rows = [records[c.prompt_index] for c in completions]
        outcome, steps, parts = rewards.score(rows, completions)
        times["time/generate_s"] += t1 - t0
        times["time/reward_s"] += time.perf_counter() - t1
        groups = []
        for g, rec in enumerate(records):
            sl = slice(g * ro.n, (g + 1) * ro.n)
            group = Scored(rec, completions[sl], outcome[sl], steps[sl], parts[sl])
            groups.append((group, group.zero_variance()))
        return groups

    kept, seen, rounds = dynamic_sampling(sampler, ro, one_round)
    return kept, seen, {**times, "rollout/rounds": rounds}


def dynamic_sampling(
    sampler: PromptSampler, ro: RolloutConfig, one_round: Callable[[list[dict], int], list[tuple[Any, bool]]]
) -> tuple[list, list, int]:
    """DAPO's refill loop around ``one_round(records, round_) -> [(group, rewards_all_equal)]``:
    without ``ro.dynamic_sampling`` one round, every group kept; with it, equal-reward groups are
    dropped and up to ``ro.max_refill_rounds`` more batches of prompts drawn until
    ``ro.prompts_per_step`` groups are kept. Returns (kept, every group, rounds run)."""
    kept, seen, rounds = [], [], 0
    for round_ in range(1 + (ro.max_refill_rounds if ro.dynamic_sampling else 0)):
        for group, equal in one_round(sampler.take(ro.prompts_per_step), round_):
            seen.append(group)
            if not (ro.dynamic_sampling and equal):
                kept.append(group)
        rounds += 1
        if len(kept) >= ro.prompts_per_step:
            break
    return kept[: ro.prompts_per_step], seen, rounds


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


# ---------------------------------------------------------------- multi-turn


def check_multi_turn(mt: MultiTurnConfig, algo: Any, rewards: list[RewardTermConfig]) -> None:
    """ConfigError unless the environment exists and the algorithm and reward terms work over turns."""
    from posttrain.rollout.multiturn import get_env
    from posttrain.train.rl_update import MULTI_TURN_ADVANTAGES_EXCLUDED

    get_env(mt.env)  # an unknown name is a ConfigError listing the registered ones
    if mt.max_turns < 1:
        raise ConfigError(
            "max_turns must be >= 1", where="data.multi_turn.max_turns", fix="e.g. max_turns: 2"
        )
    if not 0.0 < mt.gamma <= 1.0:
        raise ConfigError(
            f"gamma must be in (0, 1], got {mt.gamma}", where="data.multi_turn.gamma", fix="1.0 = no discount"
        )
    if algo.advantage in MULTI_TURN_ADVANTAGES_EXCLUDED:
        raise ConfigError(
            f"algorithm.advantage={algo.advantage} reads token positions; multi-turn advantages are per turn",
            where="algorithm.advantage",
            fix="use grpo, dr_grpo, rloo, reinforce, reinforce_baseline or reinforce_pp",
        )
    if algo.kl.placement == "reward" and (algo.kl.coef > 0 or algo.kl.target is not None):
        raise ConfigError(
            "a KL penalty in the reward is not credited across turns",
            where="algorithm.kl.placement",
            fix="use algorithm.kl.placement: loss with data.multi_turn",
        )
    if rewards != [RewardTermConfig()]:
        raise ConfigError(
            "with data.multi_turn the environment scores every turn; reward terms are not used",
            where="rewards",
            fix="drop the rewards section, or pick the environment with data.multi_turn.env",
        )


def _all_equal(values: list[float]) -> bool:
    return max(values) - min(values) <= 1e-9 * max(1.0, abs(values[0]))


def generate_conversations(
    engine: Any,
    sampler: PromptSampler,
    env: ConversationEnv,
    ro: RolloutConfig,
    mt: MultiTurnConfig,
    seed: int,
    step: int,
) -> tuple[list[list[Conversation]], list[list[Conversation]], dict[str, float]]:
    """`generate_groups` for conversations: ``ro.n`` per prompt; turn k of round r is seeded by
    ``rollout_seed(seed, step, r + 1000 k)``. Dynamic sampling drops groups whose conversation
    returns are all equal. Returns (kept groups, every generated group, timings)."""
    params = sampling_params(ro)
    times = {"time/generate_s": 0.0}

    def one_round(records: list[dict], round_: int) -> list[tuple[list[Conversation], bool]]:
        t0 = time.perf_counter()
        seeds = lambda turn: rollout_seed(seed, step, round_ + 1000 * turn)  # noqa: E731
        with sampling_context(engine, ro):
            convs = rollout_conversations(engine, records, env, params, mt.max_turns, seeds)
        times["time/generate_s"] += time.perf_counter() - t0  # the environment's verifiers included
        groups = [convs[g * ro.n : (g + 1) * ro.n] for g in range(len(records))]
        return [(g, _all_equal([conversation_return(c.rewards, mt.credit) for c in g])) for g in groups]

    kept, seen, rounds = dynamic_sampling(sampler, ro, one_round)
    return kept, seen, {**times, "rollout/rounds": rounds}


@dataclass
class EpisodeBatch:
    """Kept conversation groups as trainer rows, and the per-turn credits the advantages read.

    ``groups``: per prompt, the `EpisodeRow`s of its conversations (`rollout_tensors` input);
    ``rows`` the same rows flattened in that order. Per conversation c (C of them, K = most
    turns): ``credits`` (C, K) turn k's credit, ``turn_valid`` (C, K), ``returns`` (C,) and
    ``group`` (C,) its prompt's index.
    """

    groups: list[Scored]
    rows: list[EpisodeRow]
    credits: torch.Tensor
    turn_valid: torch.Tensor
    returns: torch.Tensor
    group: torch.Tensor


def episode_batch(
    groups: list[list[Conversation]], tokenizer: Any, mt: MultiTurnConfig
) -> tuple[EpisodeBatch, dict[str, float]]:
    """Episodes of every kept conversation (`conversation_episodes`) and how they were split."""
    scored, credits, returns, gid = [], [], [], []
    for g, convs in enumerate(groups):
        rows: list[EpisodeRow] = []
        for conv in convs:
            c_id = len(credits)
            rows += conversation_episodes(
                tokenizer, conv, mt.credit, mt.gamma, merge=mt.merge, conversation=c_id
            )
            credits.append(turn_credits(conv.rewards, len(conv.turns), mt.credit, mt.gamma))
            returns.append(conversation_return(conv.rewards, mt.credit))
            gid.append(g)
        empty = [[] for _ in rows]
        scored.append(Scored(convs[0].record, rows, [r.reward for r in rows], empty, [{} for _ in rows]))
    k = max(map(len, credits))
    table = torch.zeros((len(credits), k))
    for c, values in enumerate(credits):
        table[c, : len(values)] = torch.tensor(values)
    turn_valid = torch.arange(k)[None, :] < torch.tensor([len(v) for v in credits])[:, None]
    flat = [r for s in scored for r in s.completions]
    merged = sum(len(r.spans) > 1 for r in flat)
    metrics = {
        "multiturn/episodes_per_conversation": len(flat) / len(credits),
        "multiturn/merged_frac": merged / len(credits),
    }
    batch = EpisodeBatch(scored, flat, table, turn_valid, torch.tensor(returns), torch.tensor(gid))
    return batch, metrics


def conversation_metrics(
    seen: list[list[Conversation]], kept: list[list[Conversation]], credit: str
) -> dict[str, float]:
    """Returns, turns per conversation, per-turn reward means, turn lengths, over every generated group."""
    convs = [c for g in seen for c in g]
    turns = [t for c in convs for t in c.turns]
    returns = torch.tensor([conversation_return(c.rewards, credit) for c in convs])
    lengths = torch.tensor([len(t.token_ids) for t in turns], dtype=torch.float)
    out = {
        "reward/total_mean": float(returns.mean()),
        "reward/total_std": float(returns.std()) if returns.numel() > 1 else 0.0,
        "multiturn/turns_mean": sum(len(c.turns) for c in convs) / len(convs),
        "multiturn/done_frac": sum(c.done for c in convs) / len(convs),
        "response/length_mean": float(lengths.mean()),
        "response/length_max": float(lengths.max()),
        "response/clipped_ratio": sum(t.finish_reason == "length" for t in turns) / len(turns),
        "rollout/zero_variance_frac": sum(
            _all_equal([conversation_return(c.rewards, credit) for c in g]) for g in seen
        )
        / len(seen),
        "rollout/groups_kept": len(kept),
    }
    for k in range(max(len(c.turns) for c in convs)):
        reached = [c.rewards[k] for c in convs if len(c.rewards) > k]
        out[f"reward/turn{k + 1}_mean"] = sum(reached) / len(reached)
        out[f"multiturn/turn{k + 1}_frac"] = len(reached) / len(convs)
    return out
