"""The optimisation half of an online-RL step: forwards, the mini-batch loss, the PPO epochs.

Per mini-batch (rows of the rollout, all tensors (B, T) over completion tokens)::

    L = L_pg(logp, old_logp, A; clip_low, clip_high, dual_clip)          policy loss (registry)
        - c_H * aggregate(H_t)                                          entropy bonus
        + beta * aggregate(k(logp, ref_logp))      if KL placement = loss
        + c_V * 1/2 max((V - R)^2, (V_old + clip(V - V_old, +-eps_V) - R)^2)   PPO critic

each term aggregated by `posttrain.algos.aggregate.aggregate_loss` (``loss_agg``; the
seq-mean-token-sum constant is max_new_tokens). With a rollout correction the advantages are
A_t * w_t (w the capped importance weight trainer / sampler). One optimiser step per mini-batch,
accumulated over ``micro_batches`` forward/backward passes whose losses are weighted by their share
of the mini-batch's tokens (token-mean) or rows, so the gradient does not depend on the split
(on several ranks each takes its slice of every mini-batch's rows: `posttrain.train.rl_dist`);
``ppo_epochs`` passes over the rollout in a fresh row order each (a generator seeded by the
recipe seed and the step). The critic is a `ScalarHead` on the policy's last hidden states:
one backbone forward gives the log-probs (LM head at completion positions only) and V(s_t),
read at the position that predicts token t.
"""

from __future__ import annotations

import inspect
import math
from collections import defaultdict
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Any, Literal

import torch

from posttrain.algos.advantages import ADVANTAGES, compute_advantages
from posttrain.algos.aggregate import AggMode
from posttrain.algos.entropy import high_entropy_mask
from posttrain.algos.kl import kl_in_loss
from posttrain.algos.policy_losses import POLICY_LOSSES, SEQUENCE_LOSSES, entropy_bonus, get_policy_loss
from posttrain.algos.rollout_correction import mismatch_metrics
from posttrain.algos.value_losses import clipped_value_loss
from posttrain.distributed.parallel import all_reduce_sum, call, grad_sync, is_main, world
from posttrain.errors import ConfigError, TrainingAnomaly
from posttrain.monitor.logger import check_finite
from posttrain.train.lm_loss import chunked_logprobs, selected_hidden, supports_fused_head, token_logprobs
from posttrain.train.optim import clip_grads, optimizer_step
from posttrain.train.rl_data import select_rows
from posttrain.train.rl_dist import length_parts, pass_budget, rank_parts, reduce_metrics

Metrics = dict[str, float]


@dataclass
class KLConfig:
    """The KL(pi || pi_ref) regulariser."""

    coef: float = 0.0
    """beta; 0 with no target = no reference model at all."""
    placement: Literal["loss", "reward"] = "loss"
    """loss (GRPO style, differentiated) | reward (PPO style, r_t -= beta * k_t, through the advantages)."""
    estimator: Literal["k1", "k2", "k3"] = "k3"
    """k1 = log(pi/pi_ref) | k2 = (log r)^2 / 2 | k3 = r - 1 - log r (r = pi_ref / pi)."""
    target: float | None = None
    """Adaptive beta (Ziegler et al. 2019): target KL per sequence; null = fixed beta."""
    horizon: int = 10000
    """Adaptive rule horizon, in samples."""


@dataclass
class RolloutCorrectionConfig:
    """Importance weights of the trainer w.r.t. the sampler (`posttrain.algos.rollout_correction`)."""

    level: Literal["token", "sequence", "geometric"] = "token"
    """token: exp(d_t) | sequence: exp(sum_t d_t) | geometric: exp(mean_t d_t), d = trainer - sampler log-prob."""
    mode: Literal["truncate", "mask"] = "truncate"
    """truncate (TIS): min(w, cap) | mask (masked IS): w where w <= cap, the token dropped otherwise."""
    cap: float = 2.0
    """C > 1."""


@dataclass
class EntropyControlConfig:
    """Adaptive entropy-bonus coefficient (`posttrain.algos.entropy.adaptive_entropy_coef`)."""

    low: float = 0.3
    """Lower edge of the target band of mean token entropy (nats): below it the coefficient rises."""
    high: float = 1.0
    """Upper edge: above it the coefficient falls toward coef_min."""
    delta: float = 1e-3
    """Change of the coefficient per RL step."""
    coef_min: float = 0.0
    coef_max: float = 0.05


@dataclass
class AlgorithmConfig:
    """Advantage estimator + policy loss and their hyper-parameters."""

    advantage: str = "grpo"
    """gae (PPO, with a critic) | grpo | grpo_process | dr_grpo | rloo | reinforce | reinforce_baseline |
    reinforce_pp, or a name added with register_advantage."""
    policy_loss: str = "ppo_clip"
    """ppo_clip | vanilla | gspo | cispo | gmpo | sapo | dppo | kl_cov, or a name added with
    register_policy_loss (equations in `posttrain.algos.policy_losses`)."""
    gamma: float = 1.0
    """Discount (gae, reinforce family)."""
    lam: float = 0.95
    """GAE lambda."""
    eps: float = 1e-6
    """Added to group std (grpo)."""
    clip_low: float = 0.2
    """PPO ratio clip below: 1 - clip_low."""
    clip_high: float = 0.2
    """PPO ratio clip above: 1 + clip_high (> clip_low = DAPO clip-higher)."""
    dual_clip: float | None = None
    """Dual-clip bound c > 1 for negative advantages; null = off."""
    sapo_tau_pos: float = 1.0
    """sapo: gate temperature of tokens with A > 0."""
    sapo_tau_neg: float = 1.05
    """sapo: gate temperature of tokens with A < 0 (larger = negative tokens damped sooner)."""
    dppo_delta: float = 0.15
    """dppo: divergence bound of the trust region."""
    dppo_divergence: Literal["tv", "kl"] = "tv"
    """dppo: tv = |p - q| | kl = Bernoulli KL, of the sampled token's probability."""
    cov_frac: float = 0.002
    """kl_cov: share of tokens (largest log-prob x advantage covariance) given the KL penalty."""
    cov_coef: float = 1.0
    """kl_cov: weight of |logp - old_logp| on the selected tokens."""
    entropy_coef: float = 0.0
    """Entropy bonus coefficient (the entropy is logged either way); the starting value with entropy_control."""
    entropy_control: EntropyControlConfig | None = None
    """Adapt entropy_coef after every step to hold the entropy in [low, high]; null = fixed."""
    high_entropy_frac: float | None = None
    """"80/20" updates: only the top fraction (e.g. 0.2) of each micro-batch's tokens by entropy
    keep their advantage (the others get A = 0: no policy gradient); null = every token."""
    rollout_correction: RolloutCorrectionConfig | None = None
    """Correct the policy loss for the sampler/trainer log-prob mismatch (forces recomputed old
    log-probs); null = off. The mismatch is logged (mismatch/*) either way."""
    loss_agg: AggMode = "token-mean"
    """token-mean | seq-mean-token-mean | seq-mean-token-sum (normalised by max_new_tokens)."""
    ppo_epochs: int = 1
    """Passes over each rollout."""
    mini_batches: int = 1
    """Optimiser steps per pass (rows split evenly)."""
    micro_batches: int = 1
    """Forward/backward passes per optimiser step (gradient accumulation, rows split evenly); the
    gradient is the same as one pass over the mini-batch, whatever the split."""
    micro_batch_tokens: int | None = None
    """> 0: passes hold rows of similar length, at most this many padded tokens each (rows x the
    longest; at least micro_batches passes): less padding computed, same gradient (verl's dynamic
    batch size); 0 = rows split evenly in their own order; null = the device's default
    (`posttrain.train.rl_dist.pass_budget`); no-grad scoring passes use the same budget."""
    value_coef: float = 0.5
    """Critic loss weight (gae only)."""
    value_clip: float | None = 0.2
    """Critic value clip range; null = unclipped MSE (gae only)."""
    old_logprobs: Literal["auto", "rollout", "update", "recompute"] = "auto"
    """Old log-probs from the sampler (rollout), the update's own forward detached (update: one
    optimiser step per rollout only), a no-grad forward (recompute), or auto
    (`posttrain.train.rl.old_logprob_source`)."""
    kl: KLConfig = field(default_factory=KLConfig)

    def validate(self) -> None:
        for key, registry in (("advantage", ADVANTAGES), ("policy_loss", POLICY_LOSSES)):
            if getattr(self, key) not in registry:
                raise ConfigError(
                    f"unknown {key.replace('_', ' ')} {getattr(self, key)!r}",
                    where=f"algorithm.{key}",
                    fix=f"use one of: {', '.join(sorted(registry))}",
                )
        if self.policy_loss in SEQUENCE_LOSSES and self.loss_agg == "seq-mean-token-sum":
            raise ConfigError(
                f"policy_loss={self.policy_loss} is one term per sequence (its ratio is already a "
                "per-token mean of the sequence's log-probs); seq-mean-token-sum would weight each "
                "sequence by its length / max_new_tokens, which gives no per-sequence objective",
                where="algorithm.loss_agg",
                fix="use seq-mean-token-mean (the paper's mean over sequences) or token-mean",
            )
        if self.ppo_epochs < 1 or self.mini_batches < 1 or self.micro_batches < 1:
            raise ConfigError(
                "ppo_epochs, mini_batches and micro_batches must be >= 1", where="algorithm.ppo_epochs"
            )
        if self.micro_batch_tokens is not None and self.micro_batch_tokens < 0:
            raise ConfigError(
                f"micro_batch_tokens must be >= 0, got {self.micro_batch_tokens}",
                where="algorithm.micro_batch_tokens",
                fix="0 (rows split evenly) or a padded-token budget per pass, e.g. 4096",
            )
        self._validate_control()
        if self.kl.coef < 0 or (self.kl.target is not None and self.kl.target <= 0):
            raise ConfigError("kl.coef must be >= 0 and kl.target > 0", where="algorithm.kl")
        if self.kl.target is not None and self.kl.coef == 0:
            raise ConfigError("an adaptive KL needs a starting coef > 0", where="algorithm.kl.coef")

    def update_old_logprobs_blocker(self) -> str | None:
        """Why the update's own forward cannot serve as the old log-probs (None: it can)."""
        if self.ppo_epochs > 1 or self.mini_batches > 1:
            return "only the first optimiser step on a rollout runs at the weights that sampled it"
        if self.rollout_correction is not None:
            return "the rollout correction weighs the old log-probs before the update"
        if self.kl.placement == "reward" and (self.kl.coef > 0 or self.kl.target is not None):
            return "a KL penalty in the reward needs the old log-probs before the update"
        return None

    def _validate_control(self) -> None:
        rc, ec = self.rollout_correction, self.entropy_control
        if rc is not None and rc.cap <= 1:
            raise ConfigError(
                f"a correction cap must be > 1, got {rc.cap} (w <= 1 would cut on-policy tokens)",
                where="algorithm.rollout_correction.cap",
                fix="e.g. cap: 2.0",
            )
        if rc is not None and self.old_logprobs == "rollout":
            raise ConfigError(
                "the correction weighs the trainer's log-probs against the sampler's; "
                "old_logprobs=rollout makes them the same numbers",
                where="algorithm.old_logprobs",
                fix="use old_logprobs: auto or recompute",
            )
        blocker = self.update_old_logprobs_blocker()
        if self.old_logprobs == "update" and blocker:
            raise ConfigError(
                f"old_logprobs=update takes the update's own forward as the old policy, but {blocker}",
                where="algorithm.old_logprobs",
                fix="use old_logprobs: auto or recompute",
            )
        if ec is not None and ec.low > ec.high:
            raise ConfigError(
                f"entropy band lower bound {ec.low} > upper bound {ec.high}",
                where="algorithm.entropy_control.low",
                fix="set low <= high",
            )
        if ec is not None and not (0 <= ec.coef_min <= ec.coef_max):
            raise ConfigError("need 0 <= coef_min <= coef_max", where="algorithm.entropy_control.coef_min")
        if self.high_entropy_frac is not None and not 0 < self.high_entropy_frac <= 1:
            raise ConfigError("high_entropy_frac must be in (0, 1]", where="algorithm.high_entropy_frac")


MULTI_TURN_ADVANTAGES_EXCLUDED = ("gae", "grpo_process")
"""Estimators that read token positions (a critic, process steps): not defined over turns."""


def turn_advantages(
    name: str,
    credits: torch.Tensor,
    turn_valid: torch.Tensor,
    returns: torch.Tensor,
    group: torch.Tensor,
    *,
    baseline: str,
    eps: float,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Advantage A[c, k] (C, K) of turn k of conversation c by the registered estimator ``name``.

    ``baseline="conversation"``: the estimator sees one row per conversation, its return
    ``returns[c]`` (C,), grouped by ``group`` (C,), and A[c, k] = A_c for every turn k (each
    conversation counts once, however many turns it has). ``"turn"``: one row per
    (conversation, turn) with reward ``credits[c, k]`` (C, K), grouped by (group, k): turn k is
    compared with turn k of the other conversations of its prompt that reached it.
    ``turn_valid`` (C, K) marks real turns; A is 0 elsewhere.
    """

    def estimate(scores: torch.Tensor, groups: torch.Tensor) -> tuple[torch.Tensor, dict]:
        rows = scores[:, None].float()  # one position per row: an outcome of the turn or conversation
        adv, _, metrics = compute_advantages(
            name, rows, torch.ones_like(rows), group=groups, eps=eps, gamma=1.0
        )
        return adv[:, 0], metrics

    if baseline == "conversation":
        adv, metrics = estimate(returns, group)
        return adv[:, None] * turn_valid, metrics
    slot = group[:, None] * credits.shape[1] + torch.arange(credits.shape[1])  # (prompt, turn) groups
    adv, metrics = estimate(credits[turn_valid], slot[turn_valid])
    out = torch.zeros(credits.shape)
    out[turn_valid] = adv
    return out, metrics


def spread_turns(per_turn: torch.Tensor, rows: list, valid: torch.Tensor) -> torch.Tensor:
    """Per-turn values (C, K) -> (B, T) over each episode row's turn spans (0 where not ``valid``).

    ``rows[i]`` has ``conversation`` (its c) and ``spans`` ``[(k, start, end)]`` (`EpisodeRow`).
    """
    out = torch.zeros(valid.shape)
    for i, row in enumerate(rows):
        for k, a, b in row.spans:
            out[i, a:b] = per_turn[row.conversation, k]
    return out * valid


def to_rows(flat: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Labelled-position values (N,) in row-major order -> (B, T) completion layout, 0 elsewhere."""
    return torch.zeros(valid.shape, dtype=flat.dtype, device=flat.device).masked_scatter(valid, flat)


def policy_forward(
    model: torch.nn.Module,
    value_head: torch.nn.Module | None,
    data: dict[str, torch.Tensor],
    *,
    temperature: float,
    with_entropy: bool = True,
    entropy_grad: bool = False,
    chunk_size: int = 1024,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """(logp, entropy or None, values or None) (B, T) of the completion tokens of ``data``.

    Log-probs are taken at the sampling temperature, as the engine reports them.
    """
    batch = {k: data[k] for k in ("input_ids", "labels", "attention_mask")}
    valid = data["valid"]
    if value_head is None:
        logp, entropy, _ = token_logprobs(
            model,
            batch,
            temperature=temperature,
            with_entropy=with_entropy,
            chunk_size=chunk_size,
            entropy_grad=entropy_grad,
        )
        return to_rows(logp, valid), None if entropy is None else to_rows(entropy, valid), None
    if not supports_fused_head(model):
        raise ConfigError(
            "the PPO critic reads the backbone's hidden states, which this model's head layout hides",
            where="algorithm.advantage",
            fix="use a critic-free estimator (grpo, rloo, reinforce_pp) for this model",
        )
    h, targets, _, weight = selected_hidden(model, batch)
    logits_of = lambda s, e: (h[s:e] @ weight.t()).float()  # noqa: E731
    logp, entropy = chunked_logprobs(logits_of, targets, temperature, with_entropy, chunk_size, entropy_grad)
    entropy = None if entropy is None else to_rows(entropy, valid)
    return to_rows(logp, valid), entropy, to_rows(value_head(h).float(), valid)


@torch.no_grad()
def score_rollout(
    model: torch.nn.Module,
    value_head: torch.nn.Module | None,
    data: dict[str, torch.Tensor],
    *,
    temperature: float,
    rows_per_pass: int,
    context: Any = None,
    chunk_size: int = 1024,
    token_budget: int = 0,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """No-grad log-probs (B, T) (and critic values) of the whole rollout, ``rows_per_pass`` rows at a
    time, or with ``token_budget`` > 0 in length-sorted passes of at most that many padded tokens
    (`length_parts`, at least as many passes): the same log-probs (to rounding), less padding computed.

    ``context``: entered around the passes (the adapter-disabled reference of a LoRA policy).
    """
    b, device = data["valid"].shape[0], next(model.parameters()).device
    logp, values = torch.zeros(data["valid"].shape), torch.zeros(data["valid"].shape)
    passes = torch.arange(b).split(max(1, rows_per_pass))
    if token_budget > 0:
        lengths = data["attention_mask"].sum(-1)
        passes = length_parts(torch.arange(b), lengths, token_budget, len(passes))
    was_training = model.training
    model.eval()
    try:
        with context if context is not None else nullcontext():
            for rows in passes:
                part = {k: v.to(device) for k, v in select_rows(data, rows).items()}
                lp, _, v = policy_forward(
                    model,
                    value_head,
                    part,
                    temperature=temperature,
                    with_entropy=False,
                    chunk_size=chunk_size,
                )
                logp[rows, : lp.shape[1]] = lp.float().cpu()
                if v is not None:
                    values[rows, : v.shape[1]] = v.float().cpu()
    finally:
        model.train(was_training)
    return logp, values if value_head is not None else None


def loss_kwargs(fn: Any, **available: Any) -> dict[str, Any]:
    """The hyper-parameters a registered loss declares, from those the trainer has."""
    params = inspect.signature(fn).parameters
    return {k: v for k, v in available.items() if k in params}


def minibatch_loss(
    model: torch.nn.Module,
    value_head: torch.nn.Module | None,
    mb: dict[str, torch.Tensor],
    algo: AlgorithmConfig,
    kl_coef: float,
    *,
    temperature: float,
    norm: float,
    chunk_size: int = 1024,
    entropy_coef: float | None = None,
    measure_mismatch: bool = False,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The loss of one mini-batch (module docstring) and its detached metrics.

    mb: rows of the rollout with old_logp (absent: this forward's log-probs, detached, are the old
    ones; `posttrain.train.rl.old_logprob_source` "update"), advantages, mask (and ref_logp when the KL sits in
    the loss; old_values and returns with a critic; is_weight with a rollout correction, applied
    as A_t * w_t). ``entropy_coef``: the controller's current value (default algo.entropy_coef).
    ``measure_mismatch``: the weights are those that sampled ``mb``; log the trainer/sampler gap.
    """
    agg = algo.loss_agg
    c_h = algo.entropy_coef if entropy_coef is None else entropy_coef
    logp, entropy, values = policy_forward(
        model,
        value_head,
        mb,
        temperature=temperature,
        entropy_grad=c_h != 0 or algo.entropy_control is not None,
        chunk_size=chunk_size,
    )
    mask = mb["mask"]
    metrics: dict[str, torch.Tensor] = {}
    if measure_mismatch and "sampler_logp" in mb:
        metrics.update(mismatch_metrics(logp, mb["sampler_logp"], mb["valid"]))
    adv = mb["advantages"] * mb["is_weight"] if "is_weight" in mb else mb["advantages"]
    if algo.high_entropy_frac is not None:  # A = 0 off the kept tokens: zero loss, same normaliser
        keep = high_entropy_mask(entropy, mask, algo.high_entropy_frac)
        adv = adv * keep
        metrics["pg/high_entropy_frac"] = keep.sum() / mask.sum().clamp(min=1)
    fn = get_policy_loss(algo.policy_loss)
    kwargs = loss_kwargs(
        fn, clip_low=algo.clip_low, clip_high=algo.clip_high, dual_clip=algo.dual_clip, agg=agg, norm=norm,
        tau_pos=algo.sapo_tau_pos, tau_neg=algo.sapo_tau_neg, delta=algo.dppo_delta,
        divergence=algo.dppo_divergence, cov_frac=algo.cov_frac, cov_coef=algo.cov_coef,
    )  # fmt: skip
    old = mb["old_logp"] if "old_logp" in mb else logp.detach() * mb["valid"]
    loss, pg_metrics = fn(logp, old, adv, mask, **kwargs)
    ent_loss, ent_metrics = entropy_bonus(entropy, mask, coef=c_h, agg=agg, norm=norm)
    metrics = {**metrics, **pg_metrics, **ent_metrics, "loss/policy": loss.detach()}
    if c_h:
        loss = loss + ent_loss
    if "ref_logp" in mb and algo.kl.placement == "loss":
        kl, kl_metrics = kl_in_loss(
            logp, mb["ref_logp"], mask, coef=kl_coef, kind=algo.kl.estimator, agg=agg, norm=norm
        )
        loss, metrics = loss + kl, {**metrics, **kl_metrics}
    if values is not None:
        vf, vf_metrics = clipped_value_loss(
            values, mb["old_values"], mb["returns"], mask, clip_range=algo.value_clip, agg=agg, norm=norm
        )
        loss, metrics = loss + algo.value_coef * vf, {**metrics, **vf_metrics, "loss/value": vf.detach()}
    return loss, {**metrics, "loss/total": loss.detach()}


def micro_share(mb: dict[str, torch.Tensor], whole: dict[str, torch.Tensor], agg: str) -> float:
    """Weight of a micro-batch's loss in its mini-batch's: its share of the aggregation's
    denominator (loss tokens for token-mean, rows otherwise), so sum_k share_k * L_k = L."""
    if agg == "token-mean":
        return float(mb["mask"].sum()) / max(float(whole["mask"].sum()), 1.0)
    return mb["mask"].shape[0] / whole["mask"].shape[0]


def _part_loss(_root: torch.nn.Module, *args: Any, **kwargs: Any):
    return minibatch_loss(*args, **kwargs)  # run inside the DDP forward (`call`); _root holds model


def old_logprob_source(
    algo: AlgorithmConfig, ro: Any, precision: str, dtype: torch.dtype, critic: bool
) -> str:
    """Where the old log-probs come from (``algorithm.old_logprobs``; auto picks), for the rollout
    settings ``ro``, the trainer's ``precision`` and the policy's weight ``dtype``:

    - ``rollout``: the sampler's (`posttrain.train.rl`); auto takes them when the policy itself
      samples in fp32, never with a rollout correction, autocast sampling or stale samples;
    - ``update``: the update's own forward, detached. When the rollout gets exactly one optimiser
      step (ppo_epochs = mini_batches = 1), that forward runs at the old weights, so it gives the
      numbers a recompute pass would, without the pass (TRL does the same with one iteration);
      auto takes it unless a rollout correction or a KL penalty in the reward needs the old
      log-probs before the update (`AlgorithmConfig.update_old_logprobs_blocker`), or a critic's
      values need that pass anyway;
    - ``recompute``: one no-grad forward before the update.
    """
    if algo.old_logprobs != "auto":
        return algo.old_logprobs
    exact_sampler = (
        algo.rollout_correction is None
        and ro.autocast is None
        and precision == "fp32"
        and not ro.max_staleness
    )  # bf16 decode with a KV cache does not give the trainer's bf16 numbers
    if exact_sampler and ro.backend in ("hf", "ray") and dtype == torch.float32:
        return "rollout"
    if not critic and algo.update_old_logprobs_blocker() is None:
        return "update"
    return "recompute"


def accumulate(
    model,
    value_head,
    data,
    rows,
    algo,
    kl_coef,
    *,
    temperature,
    norm,
    chunk_size,
    entropy_coef,
    measure,
    module=None,
) -> tuple[float, list[tuple[dict[str, torch.Tensor], bool]], int]:
    """Forward/backward this rank's parts of the mini-batch ``rows`` (`rank_parts`: all of it in
    ``algo.micro_batches`` parts in one process), gradients summed; each part's loss weighs its
    share of the whole mini-batch (`micro_share`), times the world size under DDP. ``module``: the
    trained module, DDP-wrapped on several ranks (policy, or policy + critic); default ``model``.

    Returns (this rank's part of the mini-batch loss, each part's (metrics, real), tokens).
    """
    module = model if module is None else module
    device = next(model.parameters()).device
    whole = {"mask": data["mask"][rows]}
    total, parts, tokens, scale = 0.0, [], 0, world()
    budget = pass_budget(algo.micro_batch_tokens, device)
    pieces = rank_parts(rows, algo.micro_batches, data["attention_mask"].sum(-1), budget)
    for i, (part, real) in enumerate(pieces):
        mb = {k: v.to(device) for k, v in select_rows(data, part).items()}
        with grad_sync(module, i == len(pieces) - 1):
            loss, metrics = call(
                module, _part_loss, model, value_head, mb, algo, kl_coef, temperature=temperature, norm=norm,
                chunk_size=chunk_size, entropy_coef=entropy_coef, measure_mismatch=measure,
            )  # fmt: skip
            share = micro_share(mb, whole, algo.loss_agg) if real else 0.0
            (loss * (share * scale) if scale > 1 else loss * share).backward()
        total += float(loss.detach()) * share
        parts.append((metrics, real))
        tokens += int(mb["attention_mask"].sum()) if real else 0
    return total, parts, tokens


def ppo_update(
    module: torch.nn.Module,
    model: torch.nn.Module,
    value_head: torch.nn.Module | None,
    data: dict[str, torch.Tensor],
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    algo: AlgorithmConfig,
    kl_coef: float,
    *,
    generator: torch.Generator,
    temperature: float,
    norm: float,
    max_grad_norm: float,
    step: int,
    chunk_size: int = 1024,
    entropy_coef: float | None = None,
) -> tuple[Metrics, int]:
    """ppo_epochs x mini_batches optimiser steps on the rollout (each accumulating micro_batches
    passes); returns (mean metrics, tokens processed). The first mini-batch, at the weights that
    sampled the rollout, measures the sampler/trainer mismatch when ``data`` has sampler_logp.

    A non-finite loss or grad norm raises `TrainingAnomaly` before that optimiser step, with
    ``exc.applied`` = how many optimiser steps of this RL step had been taken.
    """
    sums: dict[str, float] = defaultdict(float)
    counts: dict[str, int] = defaultdict(int)
    applied, tokens = 0, 0
    for _ in range(algo.ppo_epochs):
        order = torch.randperm(data["valid"].shape[0], generator=generator)
        for rows in order.tensor_split(min(algo.mini_batches, order.numel())):
            loss, parts, n = accumulate(
                model, value_head, data, rows, algo, kl_coef, temperature=temperature, norm=norm,
                chunk_size=chunk_size, entropy_coef=entropy_coef, measure=applied == 0, module=module,
            )  # fmt: skip
            grad_norm = clip_grads(module, max_grad_norm)
            try:
                check_finite(loss, "loss", step)
                check_finite(grad_norm, "grad norm", step)
            except TrainingAnomaly as exc:
                optimizer.zero_grad(set_to_none=True)
                exc.applied = applied
                raise
            optimizer_step(optimizer, scheduler)
            applied += 1
            tokens += n
            sums["loss/minibatch"] += loss  # summed over the ranks: the whole mini-batch's loss
            counts["loss/minibatch"] += 1 if is_main() else 0
            for metrics, real in parts:
                for key, value in {**metrics, "grad_norm": grad_norm}.items():
                    value = float(value)
                    if not real or not math.isfinite(value):
                        continue
                    if key.endswith("_max"):  # a maximum over the step, not a mean
                        sums[key], counts[key] = max(sums.get(key, value), value), 1
                    else:
                        sums[key] += value
                        counts[key] += 1
    return reduce_metrics(sums, counts), int(all_reduce_sum([tokens])[0])
