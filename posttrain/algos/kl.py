"""KL regularisation to the frozen reference policy: estimators, placement, coefficient.

Estimators (Schulman, "Approximating KL divergence", 2020) of KL(pi_theta || pi_ref) from
tokens sampled from pi_theta, per token, with log r = ref_logp - logp:

- ``k1 = -log r``: unbiased, high variance, can be negative;
- ``k2 = (log r)^2 / 2``: biased, low variance, >= 0;
- ``k3 = (r - 1) - log r``: unbiased, low variance, >= 0 (GRPO's choice, DeepSeekMath eq. 4).

Two placements:

- in the reward (PPO / InstructGPT style): r'_t = r_t - beta * k_t on every completion token
  (`kl_in_reward`), so the penalty flows through the advantages (GAE, REINFORCE++);
- in the loss (GRPO style): L += beta * aggregate(k_t) (`kl_in_loss`), differentiated directly.

The coefficient beta is fixed or adaptive (`KLController`, Ziegler et al. 2019).
All tensors are (B, T); when logp == ref_logp every estimator is exactly 0.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

from posttrain.algos.aggregate import AggMode, aggregate_loss

KLKind = Literal["k1", "k2", "k3"]
KL_KINDS: tuple[str, ...] = ("k1", "k2", "k3")
Metrics = dict[str, torch.Tensor]


def kl_estimate(
    logp: torch.Tensor, ref_logp: torch.Tensor, kind: KLKind = "k3", *, k3_max: float = 10.0
) -> torch.Tensor:
    """Per-token estimate of KL(pi || pi_ref) (B, T) from log-probs (B, T) of tokens sampled from pi.

    k3 is clamped to ``k3_max`` (as verl does) so a token the reference finds far more likely
    (r = exp(ref - logp) huge) cannot make the loss inf.
    """
    log_r = ref_logp - logp
    if kind == "k1":
        return -log_r
    if kind == "k2":
        return 0.5 * log_r**2
    if kind == "k3":
        return (torch.expm1(log_r) - log_r).clamp(max=k3_max)
    raise ValueError(f"unknown KL estimator {kind!r}; valid: {', '.join(KL_KINDS)}")


def _stats(kl: torch.Tensor, mask: torch.Tensor) -> Metrics:
    m = mask.to(kl.dtype)
    kl = kl.detach()
    return {"kl/token_mean": aggregate_loss(kl, m, "token-mean"), "kl/seq_sum": (kl * m).sum(-1).mean()}


def kl_in_reward(
    token_rewards: torch.Tensor,
    logp: torch.Tensor,
    ref_logp: torch.Tensor,
    mask: torch.Tensor,
    *,
    coef: float,
    kind: KLKind = "k1",
) -> tuple[torch.Tensor, Metrics]:
    """PPO-style penalty in the reward: r'_t = r_t - coef * k_t on completion tokens (Ouyang et al. 2022, eq. 2).

    token_rewards, logp, ref_logp, mask: (B, T). The log-probs are detached (rewards are
    constants). Returns (shaped rewards (B, T), metrics).
    """
    kl = kl_estimate(logp.detach(), ref_logp.detach(), kind)
    shaped = token_rewards - coef * kl * mask.to(kl.dtype)
    return shaped, _stats(kl, mask)


def kl_in_loss(
    logp: torch.Tensor,
    ref_logp: torch.Tensor,
    mask: torch.Tensor,
    *,
    coef: float,
    kind: KLKind = "k3",
    agg: AggMode = "token-mean",
    norm: float = 1.0,
) -> tuple[torch.Tensor, Metrics]:
    """GRPO-style penalty in the loss: L_kl = coef * aggregate(k_t, mask, agg, norm) (DeepSeekMath eq. 3).

    logp (B, T) differentiable; ref_logp (B, T) constants; gradients flow through logp.
    """
    kl = kl_estimate(logp, ref_logp.detach(), kind)
    return coef * aggregate_loss(kl, mask, agg, norm=norm), _stats(kl, mask)


def adaptive_kl_coef(coef: float, observed_kl: float, *, target: float, horizon: int, n_steps: int) -> float:
    """Adaptive beta (Ziegler et al. 2019, section 2.2): e = clip(KL / target - 1, -0.2, 0.2);
    beta <- beta * (1 + e * n_steps / horizon). n_steps: samples (or steps) since the last update."""
    error = min(max(observed_kl / target - 1.0, -0.2), 0.2)
    return coef * (1.0 + error * n_steps / horizon)


@dataclass
class KLController:
    """The KL coefficient a trainer carries between steps: fixed when ``target`` is None, else adaptive."""

    coef: float
    """Current beta."""
    target: float | None = None
    """Target KL per sequence for the adaptive rule; None keeps ``coef`` fixed."""
    horizon: int = 10_000
    """Adaptive rule horizon, in the same unit as ``n_steps`` (samples, as in the paper)."""

    def update(self, observed_kl: float, n_steps: int) -> float:
        """Feed the KL measured on the last batch; returns the new coefficient."""
        if self.target is not None:
            self.coef = adaptive_kl_coef(
                self.coef, observed_kl, target=self.target, horizon=self.horizon, n_steps=n_steps
            )
        return self.coef
