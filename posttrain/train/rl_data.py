"""Online-RL data: prompt records, the prompt sampler, rewards of rollouts, and rollout tensors.

- Prompts: the task suite's train split (`Problem.prompt_record`: ``metadata.scorer`` = the
  task, so its verifier scores it) or a JSONL file of prompt records
  ``{"prompt": str | [messages], "metadata": {"scorer": ..., "ground_truth": ..., ...}}``.
- `PromptSampler`: one shuffled pass per epoch, deterministic in (seed, epoch); its position
  ``{"epoch", "index"}`` is checkpointed, so a resumed run sees the same prompts.
- `RewardSet`: the recipe's weighted reward terms. An outcome term scores each completion with
  a registered reward function (``scorer`` = each record's ``metadata.scorer``); the weighted
  sum sits on the completion's last token. A ``prm`` term with ``placement: steps`` reads a
  process reward model on the policy's own tokens and puts ``weight * P(step correct)`` on
  each step-end token (every step separator, and the token that closes the last step).
- `rollout_tensors`: completions -> the training batch (prompt + completion, right-padded,
  labels on the completion) and completion-aligned (B, T) tensors (T = longest completion):
  ``valid`` (a trained completion token; not the user tokens of a merged multi-turn episode),
  ``old_logp`` (the sampler's log-probs), ``rewards`` (outcome + step rewards),
  ``step_rewards`` / ``step_mask`` (the process part), ``group``.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Any, Literal

import torch

from posttrain.errors import ConfigError, DataError
from posttrain.rollout.engine import Completion


@dataclass
class MultiTurnConfig:
    """Multi-turn rollouts (`posttrain.rollout.multiturn`): conversations with an environment.

    Checked with the algorithm by `posttrain.train.rl_rollout.check_multi_turn`."""

    env: str = "followup"
    """followup (add a_k to your answer) | retry (try again when wrong) | a name added with register_env."""
    max_turns: int = 2
    """Assistant turns per conversation at most (fewer when the environment is done first)."""
    credit: Literal["per_turn", "final_broadcast"] = "final_broadcast"
    """per_turn: turn k is credited its own reward r_k; final_broadcast: the final reward R,
    R * gamma^(K-1-k) for turn k of K (`posttrain.rollout.episodes`)."""
    gamma: float = 1.0
    """Per-turn discount of final_broadcast credit, in (0, 1]."""
    baseline: Literal["conversation", "turn"] = "conversation"
    """conversation: the advantage estimator sees each conversation's return (R, or sum_k r_k
    for per_turn) once per group, and every turn gets its conversation's advantage; turn: it
    sees turn k's credit against the same turn of the group's other conversations."""
    merge: bool = True
    """One masked episode per conversation when the template is prefix-preserving and the
    sampled tokens re-render exactly; false = always one episode per turn."""


@dataclass
class RLDataConfig:
    """Where the RL prompts come from."""

    prompts: str = "tasks"
    """`tasks` (the task suite's train split) or a JSONL / JSON / Parquet file of prompt records."""
    tasks: list[str] = field(default_factory=lambda: ["arith"])
    """Task names when prompts is `tasks`."""
    levels: list[int] | None = None
    """Difficulty levels to draw (null = every level of each task)."""
    n_per_level: int = 500
    """Train problems per task and level (tasks only); the pool the sampler cycles through."""
    limit: int | None = None
    """Use only the first N records of a file."""
    seed: int = 0
    """Seed of the task-suite split and of the per-epoch shuffle."""
    multi_turn: MultiTurnConfig | None = None
    """Conversations instead of single completions (null = single-turn); the environment's
    rewards replace the `rewards` terms."""


@dataclass
class RewardTermConfig:
    """One weighted term of the training reward."""

    name: str = "scorer"
    """`scorer` (each record's metadata.scorer: task verifiers, math, code...), a registered reward
    (format, overlong, math, task, rm, prm, judge, or your own), or a task name."""
    weight: float = 1.0
    """Multiplier of this term in the total reward."""
    model: str | None = None
    """rm / prm / judge: the model folder (else each record's metadata.reward_model / judge_model)."""
    placement: Literal["outcome", "steps"] = "outcome"
    """prm only: `outcome` = the step scores aggregated by `agg` at the last token; `steps` =
    each step's score at its step-end token (needs `model` with the policy's tokenizer)."""
    agg: str = "min"
    """prm with placement=outcome: min | last | mean | product."""

    @property
    def label(self) -> str:
        return "prm_steps" if self.placement == "steps" else self.name


def check_reward_terms(terms: list[RewardTermConfig]) -> None:
    """Every term names an existing reward with valid options; else a ConfigError naming the term."""
    from posttrain.rewards.models import aggregate_steps
    from posttrain.rewards.registry import get_reward

    if not terms:
        raise ConfigError("no reward terms", where="rewards", fix="add e.g. rewards: [{name: scorer}]")
    for i, t in enumerate(terms):
        where = f"rewards[{i}]"
        if t.name != "scorer":
            try:
                get_reward(t.name)
            except ConfigError as exc:
                raise ConfigError(exc.message, where=f"{where}.name", fix=exc.fix) from None
        if t.placement == "steps" and (t.name != "prm" or not t.model):
            raise ConfigError(
                "placement=steps needs a process reward model",
                where=f"{where}.placement",
                fix="set name: prm and model: a folder written by `posttrain prm`",
            )
        if t.name == "prm":
            aggregate_steps([], t.agg)
    labels = [t.label for t in terms]
    if len(set(labels)) != len(labels):
        raise ConfigError("two reward terms share a name", where="rewards", fix="merge them into one term")


def load_prompts(cfg: RLDataConfig) -> list[dict]:
    """Prompt records ``{"prompt": [messages], "metadata": {...}}`` from the task suite or a file."""
    if cfg.prompts == "tasks":
        from posttrain.data.tasks import task_problems

        problems = task_problems(cfg.tasks, "train", cfg.n_per_level, cfg.seed, cfg.levels)
        return [p.prompt_record() for p in problems]
    from posttrain.data.loaders import load_records

    records = [r.data for r in load_records(cfg.prompts, kind="prompt", limit=cfg.limit)]
    if not records:
        raise DataError("no prompt records", where=cfg.prompts, fix="write one {prompt, metadata} per line")
    return records


def check_scorers(records: list[dict], terms: list[RewardTermConfig]) -> None:
    """With a `scorer` term, every record names a reward that exists (checked before any rollout)."""
    from posttrain.rewards.registry import get_reward

    if not any(t.name == "scorer" for t in terms):
        return
    seen: set[str] = set()
    for i, r in enumerate(records):
        scorer = r.get("metadata", {}).get("scorer")
        if not isinstance(scorer, str):
            raise DataError(
                "prompt record has no metadata.scorer",
                where=f"prompt record {i}",
                fix="add metadata.scorer, or replace the `scorer` reward term by a named reward",
            )
        if scorer not in seen:
            get_reward(scorer)
            seen.add(scorer)


class PromptSampler:
    """Cycles through `records` in a fresh shuffle per epoch (``random.Random(seed, epoch)``)."""

    def __init__(self, records: list[dict], seed: int):
        self.records, self.seed = records, seed
        self.state = {"epoch": 0, "index": 0}

    def _order(self, epoch: int) -> list[int]:
        order = list(range(len(self.records)))
        random.Random(f"{self.seed}|{epoch}").shuffle(order)
        return order

    def take(self, k: int) -> list[dict]:
        """The next `k` records (crossing into the next epoch when this one runs out)."""
        out = []
        while len(out) < k:
            epoch, index = self.state["epoch"], self.state["index"]
            if index >= len(self.records):
                self.state = {"epoch": epoch + 1, "index": 0}
                continue
            out.append(self.records[self._order(epoch)[index]])
            self.state = {"epoch": epoch, "index": index + 1}
        return out


# ---------------------------------------------------------------- rewards


@torch.no_grad()
def prm_step_scores(
    scorer: Any, prompts: list[list[int]], completions: list[list[int]], batch_size: int = 32
):
    """(completion position, P(step correct)) at every step-end token of each completion.

    The PRM (`posttrain.rewards.models.ModelScorer` of kind prm) reads ``prompt_ids +
    completion_ids`` exactly as the policy wrote them; p_k = sigmoid(v) at each separator
    before the first closing token and at that token (`step_end_mask`).
    """
    from posttrain.models.heads import step_end_mask

    out: list[list[tuple[int, float]]] = []
    for s in range(0, len(prompts), batch_size):
        seqs = [
            p + c for p, c in zip(prompts[s : s + batch_size], completions[s : s + batch_size], strict=True)
        ]
        width = max(map(len, seqs))
        ids = torch.zeros((len(seqs), width), dtype=torch.long)
        attn = torch.zeros_like(ids)
        for i, seq in enumerate(seqs):
            ids[i, : len(seq)], attn[i, : len(seq)] = torch.tensor(seq), 1
        ids, attn = ids.to(scorer.device), attn.to(scorer.device)
        start = torch.tensor([len(p) for p in prompts[s : s + batch_size]], device=scorer.device)
        values = torch.sigmoid(scorer.model(ids, attn).float())
        at = step_end_mask(ids, start, *scorer.seps) & attn.bool()
        for i in range(len(seqs)):
            pos = at[i].nonzero().squeeze(1)
            out.append([(int(q) - int(start[i]), float(values[i, q])) for q in pos])
    return out


class RewardSet:
    """The weighted reward terms of a recipe, scoring batches of completions."""

    def __init__(self, terms: list[RewardTermConfig], tokenizer: Any, max_new_tokens: int, overlong_buffer):
        check_reward_terms(terms)
        self.terms, self.max_new_tokens, self.overlong_buffer = terms, max_new_tokens, overlong_buffer
        self.prm = {}
        for i, t in enumerate(terms):
            if t.placement == "steps":
                self.prm[i] = _load_step_prm(t.model, tokenizer, f"rewards[{i}]")

    def _metadata(self, record: dict, c: Completion, term: RewardTermConfig) -> dict:
        meta = {**record.get("metadata", {}), "completion_tokens": len(c.token_ids)}
        meta["max_tokens"] = self.max_new_tokens
        if self.overlong_buffer is not None:
            meta["overlong_buffer"] = self.overlong_buffer
        if term.model:
            key = "judge_model" if term.name == "judge" else "reward_model"
            meta.update({key: term.model, "prm_agg": term.agg})
        return meta

    def score(self, records: list[dict], completions: list[Completion]):
        """Per completion: (outcome reward, [(position, step reward)], {term label: unweighted score}).

        ``records[i]`` is the prompt record of ``completions[i]``.
        """
        from posttrain.rewards.registry import as_results, get_reward, score_batch

        prompts, texts = [r["prompt"] for r in records], [c.text for c in completions]
        outcome = [0.0] * len(completions)
        steps: list[list[tuple[int, float]]] = [[] for _ in completions]
        parts: list[dict[str, float]] = [{} for _ in completions]
        for i, t in enumerate(self.terms):
            if i in self.prm:
                scored = prm_step_scores(
                    self.prm[i], [c.prompt_ids for c in completions], [c.token_ids for c in completions]
                )
                for row, found in enumerate(scored):
                    steps[row] += [(pos, t.weight * p) for pos, p in found]
                    parts[row][t.label] = sum(p for _, p in found) / len(found) if found else float("nan")
                continue
            meta = [self._metadata(r, c, t) for r, c in zip(records, completions, strict=True)]
            if t.name == "scorer":
                results = score_batch(prompts, texts, meta)
            else:
                results = as_results(get_reward(t.name)(prompts, texts, meta), len(texts), t.name)
            for row, res in enumerate(results):
                outcome[row] += t.weight * res.score
                parts[row][t.label] = res.score
        return outcome, steps, parts


def _load_step_prm(path: str, tokenizer: Any, where: str):
    from posttrain.rewards.models import cached_scorer

    scorer = cached_scorer(path)
    if scorer.kind != "prm":
        raise ConfigError(f"{path} is an outcome reward model", where=f"{where}.model", fix="use name: rm")
    if scorer.tokenizer.get_vocab() != tokenizer.get_vocab():
        raise ConfigError(
            "the process reward model has another tokenizer than the policy, so its step-end tokens "
            "cannot be placed on the policy's tokens",
            where=f"{where}.placement",
            fix="train the PRM from the policy's base model, or use placement: outcome",
        )
    return scorer


# ---------------------------------------------------------------- rollout tensors


@dataclass
class Scored:
    """One prompt's group of n completions with their rewards."""

    record: dict
    completions: list[Completion]
    outcome: list[float]
    steps: list[list[tuple[int, float]]]
    parts: list[dict[str, float]]

    def totals(self) -> list[float]:
        """Each completion's total reward (outcome + its step rewards)."""
        return [o + sum(v for _, v in s) for o, s in zip(self.outcome, self.steps, strict=True)]

    def zero_variance(self) -> bool:
        """All completions got the same total reward: no signal for group-relative advantages."""
        totals = self.totals()
        return max(totals) - min(totals) <= 1e-9 * max(1.0, abs(totals[0]))


def rollout_tensors(groups: list[Scored], pad_id: int, overlong_filter: bool) -> dict[str, torch.Tensor]:
    """The training batch and the completion-aligned (B, T) tensors of scored groups (module docstring).

    ``mask`` = ``valid``, minus completions cut by max_new_tokens when ``overlong_filter`` (DAPO's
    overlong filtering: a truncated answer is neither rewarded nor punished). The outcome
    reward sits on each completion's last token.
    """
    rows = [
        (g_i, c, o, s)
        for g_i, g in enumerate(groups)
        for c, o, s in zip(g.completions, g.outcome, g.steps, strict=True)
    ]
    b = len(rows)
    width = max(len(c.prompt_ids) + len(c.token_ids) for _, c, _, _ in rows)
    t = max(len(c.token_ids) for _, c, _, _ in rows)
    ids = torch.full((b, width), pad_id, dtype=torch.long)
    labels = torch.full((b, width), -100, dtype=torch.long)
    attn = torch.zeros((b, width), dtype=torch.long)
    valid = torch.zeros((b, t), dtype=torch.bool)
    old_logp, rewards, step_rewards = torch.zeros((b, t)), torch.zeros((b, t)), torch.zeros((b, t))
    step_mask = torch.zeros((b, t), dtype=torch.bool)
    truncated = torch.zeros(b, dtype=torch.bool)
    for i, (_, c, outcome, steps) in enumerate(rows):
        p, n = len(c.prompt_ids), len(c.token_ids)
        ids[i, : p + n] = torch.tensor(c.prompt_ids + c.token_ids)
        # A merged multi-turn episode (`EpisodeRow.loss_mask`): user tokens are context, not completion.
        keep = getattr(c, "loss_mask", None)
        keep = torch.ones(n, dtype=torch.bool) if keep is None else torch.tensor(keep, dtype=torch.bool)
        labels[i, p : p + n], attn[i, : p + n] = torch.tensor(c.token_ids).masked_fill(~keep, -100), 1
        valid[i, :n], old_logp[i, :n] = keep, torch.tensor(c.logprobs) * keep
        rewards[i, n - 1] = outcome
        for pos, value in steps:
            step_rewards[i, pos] += value
            step_mask[i, pos] = True
        truncated[i] = c.finish_reason == "length"
    mask = valid & ~truncated[:, None] if overlong_filter else valid
    return {
        "input_ids": ids,
        "labels": labels,
        "attention_mask": attn,
        "valid": valid,
        "mask": mask.float(),
        "old_logp": old_logp,
        "rewards": rewards + step_rewards,
        "step_rewards": step_rewards,
        "step_mask": step_mask,
        "group": torch.tensor([g for g, _, _, _ in rows]),
        "truncated": truncated,
    }


def select_rows(data: dict[str, torch.Tensor], rows: torch.Tensor) -> dict[str, torch.Tensor]:
    """The given rows of every tensor, trimmed on the right to the longest selected sequence."""
    width = int(data["attention_mask"][rows].sum(-1).max())
    cols = data["valid"][rows].any(0).nonzero()  # the last valid column (merged episodes have holes)
    t = int(cols.max()) + 1 if cols.numel() else 0
    out = {}
    for key, value in data.items():
        value = value[rows]
        if key in ("input_ids", "labels", "attention_mask"):
            value = value[:, :width]
        elif value.dim() == 2:
            value = value[:, :t]
        out[key] = value
    return out
