"""Policy-gradient losses: pure tensor functions, registered by name.

Every loss takes ``logp`` (B, T) = log pi_theta(y_t | y_<t) (differentiable), ``old_logp``
(B, T) = the same under the policy that sampled the batch (constants), ``advantages`` (B, T)
and ``mask`` (B, T) (1 on trained tokens), plus keyword hyper-parameters and the aggregation
``agg`` / ``norm`` of `posttrain.algos.aggregate.aggregate_loss`. It returns ``(loss, metrics)``
with detached metrics. GRPO, Dr.GRPO, RLOO and REINFORCE++ all use ``ppo_clip``; they differ in
their advantages and aggregation.

When ``logp`` and ``old_logp`` are the same numbers (first mini-batch of the first epoch, the
old log-probs taken from the same weights) the ratio is exactly 1 and no token is clipped.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from posttrain.algos.aggregate import AggMode, aggregate_loss

Metrics = dict[str, torch.Tensor]
PolicyLossFn = Callable[..., tuple[torch.Tensor, Metrics]]
POLICY_LOSSES: dict[str, PolicyLossFn] = {}


def register_policy_loss(name: str):
    """Decorator: add a loss under ``name`` (call convention in the module docstring)."""

    def wrap(fn: PolicyLossFn) -> PolicyLossFn:
        POLICY_LOSSES[name] = fn
        return fn

    return wrap


def get_policy_loss(name: str) -> PolicyLossFn:
    """The registered loss ``name``; an unknown name raises ValueError listing the valid ones."""
    if name not in POLICY_LOSSES:
        raise ValueError(f"unknown policy loss {name!r}; valid: {', '.join(sorted(POLICY_LOSSES))}")
    return POLICY_LOSSES[name]


def _mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return aggregate_loss(x.detach().float(), mask, "token-mean")


@register_policy_loss("ppo_clip")
def ppo_clip_loss(
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    *,
    clip_low: float = 0.2,
    clip_high: float = 0.2,
    dual_clip: float | None = None,
    agg: AggMode = "token-mean",
    norm: float = 1.0,
) -> tuple[torch.Tensor, Metrics]:
    """PPO clipped surrogate (Schulman et al. 2017, eq. 7) with asymmetric and dual clipping.

    rho_t = exp(logp_t - old_logp_t);
    l_t = -min(rho_t * A_t, clip(rho_t, 1 - clip_low, 1 + clip_high) * A_t)
    (clip_high > clip_low is DAPO's "clip-higher", Yu et al. 2025). Dual clip (Ye et al. 2020,
    eq. 5), for A_t < 0 only: l_t = min(l_t, -dual_clip * A_t), dual_clip > 1, bounding the loss
    of a token whose ratio exploded. Loss = aggregate(l, mask, agg, norm). Metrics: clip_frac
    (tokens where the clipped term is active), dual_clip_frac, ratio mean/max, approx_kl
    (k3 estimate of KL(pi_old || pi_theta)), over masked tokens.
    """
    log_ratio = logp - old_logp
    ratio = torch.exp(log_ratio)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1.0 - clip_low, 1.0 + clip_high)
    loss_t = torch.maximum(unclipped, clipped)
    dual = torch.zeros_like(mask, dtype=torch.bool)
    if dual_clip is not None:
        bound = -advantages * dual_clip
        dual = (advantages < 0) & (loss_t > bound)
        loss_t = torch.where(dual, bound, loss_t)
    loss = aggregate_loss(loss_t, mask, agg, norm=norm)
    lr = log_ratio.detach()
    return loss, {
        "pg/clip_frac": _mean((clipped > unclipped).float(), mask),
        "pg/dual_clip_frac": _mean(dual.float(), mask),
        "pg/ratio_mean": _mean(ratio, mask),
        "pg/ratio_max": (ratio.detach() * mask).max(),
        "pg/approx_kl": _mean(torch.expm1(lr) - lr, mask),
    }


@register_policy_loss("vanilla")
def vanilla_pg_loss(
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    *,
    agg: AggMode = "token-mean",
    norm: float = 1.0,
) -> tuple[torch.Tensor, Metrics]:
    """Unclipped policy gradient: l_t = -rho_t * A_t, rho_t = exp(logp_t - old_logp_t).

    On-policy (rho = 1) its gradient is the REINFORCE gradient -A_t * grad log pi(y_t); off-policy
    it is the importance-weighted surrogate without a trust region.
    """
    ratio = torch.exp(logp - old_logp)
    loss = aggregate_loss(-advantages * ratio, mask, agg, norm=norm)
    return loss, {"pg/ratio_mean": _mean(ratio, mask)}


def entropy_bonus(
    entropy: torch.Tensor, mask: torch.Tensor, *, coef: float, agg: AggMode = "token-mean", norm: float = 1.0
) -> tuple[torch.Tensor, Metrics]:
    """Entropy bonus as a loss term: L = -coef * aggregate(H_t, mask), H_t = -sum_v pi(v) log pi(v).

    entropy, mask: (B, T) (per-token entropies from `token_logprobs(..., with_entropy=True)`).
    Add it to the policy loss; coef = 0 gives a zero loss but still reports the entropy.
    """
    h = aggregate_loss(entropy, mask, agg, norm=norm)
    return -coef * h, {"pg/entropy": _mean(entropy, mask)}
