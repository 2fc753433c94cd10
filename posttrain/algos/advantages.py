"""Advantage estimators: per-token advantages (B, T) for every policy-gradient trainer.

Inputs are token-level so that every estimator has the same shape contract:

- ``token_rewards`` (B, T): the reward of each completion token. An outcome reward (a
  verifier's score) sits on the last completion token; a PPO-style KL penalty adds a term on
  every token (`posttrain.algos.kl.kl_in_reward`).
- ``mask`` (B, T): 1 on completion tokens, 0 on prompt and padding. Left or right padding is
  fine; estimators that discount (``gamma < 1``, GAE) count every position inside a row as a
  step, so a row's scored tokens should be contiguous (split multi-turn episodes with holes).
- ``group`` (B,) int: which prompt each row was sampled for (GRPO / Dr.GRPO / RLOO groups).
- ``values`` (B, T): the critic's V(s_t) at each completion token (GAE only).

Outcome estimators (grpo, dr_grpo, rloo) score a row by ``R = sum_t r_t`` and give every
completion token the row's advantage. Each estimator returns ``(advantages, returns,
metrics)``: advantages and returns are (B, T), zero where ``mask`` is 0; ``returns`` is the
critic's regression target for GAE and the row's (discounted) return otherwise.

`compute_advantages(name, ...)` dispatches by name and passes each estimator only the inputs
and hyper-parameters its signature declares, so estimators keep explicit arguments.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

import torch

Metrics = dict[str, torch.Tensor]
AdvantageFn = Callable[..., tuple[torch.Tensor, torch.Tensor, Metrics]]
ADVANTAGES: dict[str, AdvantageFn] = {}


def register_advantage(name: str):
    """Decorator: add an estimator under ``name`` (call convention in the module docstring)."""

    def wrap(fn: AdvantageFn) -> AdvantageFn:
        ADVANTAGES[name] = fn
        return fn

    return wrap


def get_advantage(name: str) -> AdvantageFn:
    """The registered estimator ``name``; an unknown name raises ValueError listing the valid ones."""
    if name not in ADVANTAGES:
        raise ValueError(f"unknown advantage estimator {name!r}; valid: {', '.join(sorted(ADVANTAGES))}")
    return ADVANTAGES[name]


def compute_advantages(
    name: str,
    token_rewards: torch.Tensor,
    mask: torch.Tensor,
    *,
    group: torch.Tensor | None = None,
    values: torch.Tensor | None = None,
    **hparams: Any,
) -> tuple[torch.Tensor, torch.Tensor, Metrics]:
    """Run estimator ``name`` with the inputs and hyper-parameters (gamma, lam, eps...) it declares.

    Hyper-parameters it does not take are ignored (one trainer config serves all estimators);
    a needed input that is None (``values`` for GAE, ``group`` for group estimators) is a ValueError.
    """
    fn = get_advantage(name)
    params = inspect.signature(fn).parameters
    given = {"token_rewards": token_rewards, "mask": mask, "group": group, "values": values, **hparams}
    kwargs = {k: v for k, v in given.items() if k in params}
    for key in ("group", "values"):
        if key in params and kwargs.get(key) is None:
            need = "a critic's values" if key == "values" else "group ids (the prompt of each row)"
            raise ValueError(f"advantage estimator {name!r} needs {need}: pass {key}=")
    return fn(**kwargs)


def _masked_mean_std(x: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and population std of ``x`` over positions where ``mask`` is 1."""
    m = mask.to(x.dtype)
    n = m.sum().clamp(min=1)
    mean = (x * m).sum() / n
    return mean, (((x - mean) * m) ** 2 / n).sum().sqrt()


def _metrics(adv: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor) -> Metrics:
    mean, std = _masked_mean_std(adv.detach(), mask)
    return {
        "advantages/mean": mean,
        "advantages/std": std,
        "returns/mean": _masked_mean_std(returns, mask)[0],
    }


def _group_stats(scores: torch.Tensor, group: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Per-row group mean, unbiased group std (0 for a group of one) and group size; each (B,)."""
    _, inv, counts = torch.unique(group, return_inverse=True, return_counts=True)
    n = counts.to(scores.dtype)
    mean = torch.zeros_like(n).index_add(0, inv, scores) / n
    sq = torch.zeros_like(n).index_add(0, inv, (scores - mean[inv]) ** 2)
    std = (sq / (n - 1).clamp(min=1)).sqrt()
    return mean[inv], std[inv], n[inv]


def returns_to_go(token_rewards: torch.Tensor, mask: torch.Tensor, gamma: float) -> torch.Tensor:
    """G_t = sum_{k >= t} gamma^(k-t) r_k over masked tokens; (B, T) -> (B, T), 0 off the mask."""
    m = mask.to(token_rewards.dtype)
    r = token_rewards * m
    if gamma == 1.0:
        return r.flip(-1).cumsum(-1).flip(-1) * m
    out, g = torch.zeros_like(r), torch.zeros_like(r[:, 0])
    for t in reversed(range(r.shape[1])):
        g = r[:, t] + gamma * g
        out[:, t] = g
    return out * m


@register_advantage("gae")
def gae_advantages(
    token_rewards: torch.Tensor,
    values: torch.Tensor,
    mask: torch.Tensor,
    *,
    gamma: float = 1.0,
    lam: float = 0.95,
) -> tuple[torch.Tensor, torch.Tensor, Metrics]:
    """Generalised advantage estimation (Schulman et al. 2016, eq. 16), for PPO with a critic.

    delta_t = r_t + gamma * V_{t+1} - V_t, A_t = sum_l (gamma * lam)^l delta_{t+l}; V after the
    last completion token is 0 (the episode ends there). returns_t = A_t + V_t (the lambda-return,
    the critic's target). token_rewards, values, mask: (B, T). Values are treated as constants.
    """
    m = mask.to(values.dtype)
    r, v = token_rewards * m, values.detach() * m
    adv, last = torch.zeros_like(v), torch.zeros_like(v[:, 0])
    next_v = torch.cat([v[:, 1:], torch.zeros_like(v[:, :1])], dim=1)
    delta = r + gamma * next_v - v
    for t in reversed(range(v.shape[1])):
        last = delta[:, t] + gamma * lam * last
        adv[:, t] = last
    adv, returns = adv * m, (adv + v) * m
    return adv, returns, _metrics(adv, returns, mask)


def _outcome(
    scores: torch.Tensor, adv: torch.Tensor, mask: torch.Tensor, zero: torch.Tensor, metrics: Metrics
) -> tuple[torch.Tensor, torch.Tensor, Metrics]:
    """Broadcast (B,) advantages and returns over each row's completion tokens."""
    m = mask.to(scores.dtype)
    adv_t, ret_t = adv[:, None] * m, scores[:, None] * m
    return (
        adv_t,
        ret_t,
        {**_metrics(adv_t, ret_t, mask), "advantages/zero_frac": zero.float().mean(), **metrics},
    )


@register_advantage("grpo")
def grpo_advantages(
    token_rewards: torch.Tensor, mask: torch.Tensor, group: torch.Tensor, *, eps: float = 1e-6
) -> tuple[torch.Tensor, torch.Tensor, Metrics]:
    """GRPO group z-score (Shao et al. 2024, DeepSeekMath eq. 3 / section 4.1.2).

    A_i = (R_i - mean_g(R)) / (std_g(R) + eps), std unbiased (as torch.std, TRL and verl);
    a group of one has advantage 0. R_i = sum_t r_{i,t}. token_rewards, mask: (B, T); group: (B,).
    """
    scores = (token_rewards * mask.to(token_rewards.dtype)).sum(-1)
    mean, std, n = _group_stats(scores, group)
    adv = torch.where(n > 1, (scores - mean) / (std + eps), torch.zeros_like(scores))
    return _outcome(scores, adv, mask, std == 0, {})


@register_advantage("dr_grpo")
def dr_grpo_advantages(
    token_rewards: torch.Tensor, mask: torch.Tensor, group: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, Metrics]:
    """Dr. GRPO (Liu et al. 2025, "Understanding R1-Zero-like training", eq. 4): A_i = R_i - mean_g(R).

    No division by the group std (which up-weights near-uniform groups). Pair with the
    ``seq-mean-token-sum`` aggregation (constant normaliser) to also remove the length bias.
    """
    scores = (token_rewards * mask.to(token_rewards.dtype)).sum(-1)
    mean, std, _ = _group_stats(scores, group)
    return _outcome(scores, scores - mean, mask, std == 0, {})


@register_advantage("rloo")
def rloo_advantages(
    token_rewards: torch.Tensor, mask: torch.Tensor, group: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, Metrics]:
    """REINFORCE leave-one-out (Ahmadian et al. 2024, eq. 6): A_i = R_i - 1/(k-1) sum_{j != i} R_j.

    Equals k/(k-1) * (R_i - mean_g(R)) for a group of k; a group of one has advantage 0.
    """
    scores = (token_rewards * mask.to(token_rewards.dtype)).sum(-1)
    mean, std, n = _group_stats(scores, group)
    adv = torch.where(n > 1, (scores - mean) * n / (n - 1).clamp(min=1), torch.zeros_like(scores))
    return _outcome(scores, adv, mask, std == 0, {})


@register_advantage("reinforce")
def reinforce_advantages(
    token_rewards: torch.Tensor, mask: torch.Tensor, *, gamma: float = 1.0
) -> tuple[torch.Tensor, torch.Tensor, Metrics]:
    """REINFORCE without a baseline (Williams 1992): A_t = G_t = sum_{k >= t} gamma^(k-t) r_k."""
    returns = returns_to_go(token_rewards, mask, gamma)
    return returns, returns, _metrics(returns, returns, mask)


@register_advantage("reinforce_baseline")
def reinforce_baseline_advantages(
    token_rewards: torch.Tensor, mask: torch.Tensor, *, gamma: float = 1.0
) -> tuple[torch.Tensor, torch.Tensor, Metrics]:
    """REINFORCE with a constant baseline: A_t = G_t - b, b = mean over the batch's rows of G_0.

    G_0 is each row's full (discounted) return; the baseline is shared by every row and token.
    """
    returns = returns_to_go(token_rewards, mask, gamma)
    m = mask.to(returns.dtype)
    first = m.argmax(-1)  # a row's first completion token holds its full return G_0
    rows = m.sum(-1) > 0
    b = returns.gather(1, first[:, None]).squeeze(1)[rows].mean() if rows.any() else returns.new_zeros(())
    adv = (returns - b) * m
    return adv, returns, {**_metrics(adv, returns, mask), "advantages/baseline": b.detach()}


@register_advantage("reinforce_pp")
def reinforce_pp_advantages(
    token_rewards: torch.Tensor, mask: torch.Tensor, *, gamma: float = 1.0, eps: float = 1e-8
) -> tuple[torch.Tensor, torch.Tensor, Metrics]:
    """REINFORCE++ (Hu 2025, eqs. 6-7): G_t = sum_{k >= t} gamma^(k-t) r_k, then whitened over the batch.

    A_t = (G_t - mean(G)) / (std(G) + eps), mean and population std over every completion
    token of the batch. The per-token KL penalty belongs in ``token_rewards`` (kl_in_reward).
    """
    returns = returns_to_go(token_rewards, mask, gamma)
    mean, std = _masked_mean_std(returns, mask)
    adv = (returns - mean) / (std + eps) * mask.to(returns.dtype)
    return adv, returns, _metrics(adv, returns, mask)


@register_advantage("grpo_process")
def grpo_process_advantages(
    token_rewards: torch.Tensor,
    mask: torch.Tensor,
    group: torch.Tensor,
    *,
    step_rewards: torch.Tensor | None = None,
    step_mask: torch.Tensor | None = None,
    eps: float = 1e-6,
) -> tuple[torch.Tensor, torch.Tensor, Metrics]:
    """Step-aware GRPO: GRPO's outcome z-score plus DeepSeekMath's process supervision (section 4.1.3).

    ``step_rewards`` (B, T) holds a process reward s_{i,k} at each step-end token t_k (where
    ``step_mask`` is 1); they are part of ``token_rewards`` too (so every estimator sees the
    same rewards). Outcome: R_i = sum_t (r_{i,t} - s_{i,t}), A^o_i = (R_i - mean_g) / (std_g + eps)
    as in `grpo_advantages`. Process: each step reward is normalised over every step reward
    of its group, s~ = (s - mean_g(S)) / (std_g(S) + eps) (unbiased std; 0 in a group with
    fewer than two steps), and A^p_{i,t} = sum_{k: t_k >= t} s~_{i,k}. A_{i,t} = A^o_i + A^p_{i,t}.
    Without step rewards it equals ``grpo``. returns: the undiscounted return-to-go.
    """
    m = mask.to(token_rewards.dtype)
    steps = torch.zeros_like(token_rewards) if step_rewards is None else step_rewards * m
    at = torch.zeros_like(mask, dtype=torch.bool) if step_mask is None else step_mask.bool() & mask.bool()
    adv, _, metrics = grpo_advantages(token_rewards - steps, mask, group, eps=eps)
    placed = torch.zeros_like(token_rewards)
    if at.any():
        values, rows = steps[at], at.nonzero(as_tuple=True)[0]
        mean, std, n = _group_stats(values, group[rows])
        placed[at] = torch.where(n > 1, (values - mean) / (std + eps), torch.zeros_like(values))
    adv = adv + placed.flip(-1).cumsum(-1).flip(-1) * m
    returns = returns_to_go(token_rewards, mask, 1.0)
    extra = {"advantages/zero_frac": metrics["advantages/zero_frac"], "advantages/steps": at.sum().float()}
    return adv, returns, {**_metrics(adv, returns, mask), **extra}
