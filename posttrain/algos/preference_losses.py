"""Offline preference losses: pure tensor functions, registered by name.

Notation, per pair i of a batch of B pairs (all inputs are (B,) tensors):
``pi_w, pi_l`` = log pi_theta(y_w | x), log pi_theta(y_l | x) of the chosen (w) and
rejected (l) responses; ``ref_w, ref_l`` the same under the frozen pi_ref. The
log-probs are summed over response tokens, or averaged per token for the losses
registered with ``average=True`` (the trainer passes what the registry asks for).
The implicit DPO reward is ``r = beta * (pi - ref)`` and ``h = (pi_w - ref_w) - (pi_l - ref_l)``.

Each loss returns ``(loss, metrics)``: the mean over the pairs of the batch and
detached metrics; paired losses always report ``rewards/chosen`` and
``rewards/rejected`` ((B,) each) so trainers can report margins and preference
accuracy the same way for every loss. Hyper-parameters are keyword arguments with their paper defaults; the
registry reads them from the signature (`PreferenceLoss.params`).
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

Metrics = dict[str, torch.Tensor]


@dataclass(frozen=True)
class PreferenceLoss:
    """A registered loss and what its inputs must be."""

    name: str
    fn: Callable[..., tuple[torch.Tensor, Metrics]]
    reference: bool
    """Needs pi_ref log-probs."""
    average: bool
    """Takes per-token mean log-probs instead of sums."""
    paired: bool
    """Chosen/rejected pairs; False = unpaired desirable/undesirable examples (KTO)."""

    @property
    def params(self) -> dict[str, Any]:
        """The loss's hyper-parameters and their defaults (its keyword-only arguments)."""
        sig = inspect.signature(self.fn).parameters.values()
        return {p.name: p.default for p in sig if p.kind is inspect.Parameter.KEYWORD_ONLY}


PREFERENCE_LOSSES: dict[str, PreferenceLoss] = {}


def register_preference_loss(
    name: str, *, reference: bool = True, average: bool = False, paired: bool = True
):
    """Decorator: add a loss under ``name`` (see the module docstring for the call convention)."""

    def wrap(fn):
        PREFERENCE_LOSSES[name] = PreferenceLoss(name, fn, reference, average, paired)
        return fn

    return wrap


def get_preference_loss(name: str) -> PreferenceLoss:
    """The registered loss ``name``; an unknown name raises ValueError listing the valid ones."""
    if name not in PREFERENCE_LOSSES:
        raise ValueError(f"unknown preference loss {name!r}; valid: {', '.join(sorted(PREFERENCE_LOSSES))}")
    return PREFERENCE_LOSSES[name]


def _rewards(chosen: torch.Tensor, rejected: torch.Tensor) -> Metrics:
    return {"rewards/chosen": chosen.detach(), "rewards/rejected": rejected.detach()}


@register_preference_loss("sigmoid")
def dpo_sigmoid_loss(pi_w, pi_l, ref_w, ref_l, *, beta: float = 0.1) -> tuple[torch.Tensor, Metrics]:
    """DPO (Rafailov et al. 2023, eq. 7): ``L = -log sigmoid(beta * h)``.

    h = (pi_w - ref_w) - (pi_l - ref_l), summed log-probs, (B,). Equal log-ratios
    (or beta -> 0) give log 2.
    """
    r_w, r_l = beta * (pi_w - ref_w), beta * (pi_l - ref_l)
    return -F.logsigmoid(r_w - r_l).mean(), _rewards(r_w, r_l)


@register_preference_loss("cdpo")
def conservative_dpo_loss(
    pi_w, pi_l, ref_w, ref_l, *, beta: float = 0.1, label_smoothing: float = 0.1
) -> tuple[torch.Tensor, Metrics]:
    """Conservative DPO (Mitchell 2023): labels flipped with probability eps = label_smoothing.

    ``L = -(1 - eps) log sigmoid(beta h) - eps log sigmoid(-beta h)``; the
    cross-entropy against the smoothed target (1 - eps, eps). eps = 0 is DPO.
    """
    r_w, r_l = beta * (pi_w - ref_w), beta * (pi_l - ref_l)
    z = r_w - r_l
    loss = -(1 - label_smoothing) * F.logsigmoid(z) - label_smoothing * F.logsigmoid(-z)
    return loss.mean(), _rewards(r_w, r_l)


@register_preference_loss("robust")
def robust_dpo_loss(
    pi_w, pi_l, ref_w, ref_l, *, beta: float = 0.1, label_smoothing: float = 0.1
) -> tuple[torch.Tensor, Metrics]:
    """Robust DPO (Chowdhury et al. 2024, eq. 10), unbiased under label noise eps < 0.5:

    ``L = [(1 - eps) (-log sigmoid(beta h)) - eps (-log sigmoid(-beta h))] / (1 - 2 eps)``.
    """
    if not 0.0 <= label_smoothing < 0.5:
        raise ValueError(f"robust DPO needs 0 <= label_smoothing < 0.5, got {label_smoothing}")
    r_w, r_l = beta * (pi_w - ref_w), beta * (pi_l - ref_l)
    z = r_w - r_l
    loss = (-(1 - label_smoothing) * F.logsigmoid(z) + label_smoothing * F.logsigmoid(-z)) / (
        1 - 2 * label_smoothing
    )
    return loss.mean(), _rewards(r_w, r_l)


@register_preference_loss("ipo", average=True)
def ipo_loss(pi_w, pi_l, ref_w, ref_l, *, beta: float = 0.1) -> tuple[torch.Tensor, Metrics]:
    """IPO (Azar et al. 2023, eq. 17) with tau = beta: ``L = (h - 1 / (2 tau))^2``.

    Deviation (as in TRL, confirmed by the authors): the log-probs are per-token
    means, so tau does not depend on response length.
    """
    h = (pi_w - ref_w) - (pi_l - ref_l)
    return ((h - 1 / (2 * beta)) ** 2).mean(), _rewards(beta * (pi_w - ref_w), beta * (pi_l - ref_l))


@register_preference_loss("hinge")
def hinge_loss(pi_w, pi_l, ref_w, ref_l, *, beta: float = 0.1) -> tuple[torch.Tensor, Metrics]:
    """SLiC-HF hinge (Zhao et al. 2023) on the DPO log-ratio: ``L = max(0, 1 - beta h)``."""
    r_w, r_l = beta * (pi_w - ref_w), beta * (pi_l - ref_l)
    return torch.relu(1 - (r_w - r_l)).mean(), _rewards(r_w, r_l)


@register_preference_loss("simpo", reference=False, average=True)
def simpo_loss(
    pi_w, pi_l, ref_w=None, ref_l=None, *, beta: float = 2.0, target_margin: float = 1.0
) -> tuple[torch.Tensor, Metrics]:
    """SimPO (Meng et al. 2024, eq. 6), reference-free and length-normalised:

    ``L = -log sigmoid(beta / |y_w| log pi(y_w) - beta / |y_l| log pi(y_l) - gamma)``,
    gamma = target_margin; pi_w, pi_l are per-token mean log-probs (B,).
    """
    r_w, r_l = beta * pi_w, beta * pi_l
    return -F.logsigmoid(r_w - r_l - target_margin).mean(), _rewards(r_w, r_l)


def log_odds(mean_logp: torch.Tensor) -> torch.Tensor:
    """log(P / (1 - P)) with P = exp(mean token log-prob) < 1, computed stably."""
    return mean_logp - torch.log1p(-torch.exp(mean_logp.clamp(max=-1e-6)))


@register_preference_loss("orpo", reference=False, average=True)
def orpo_loss(pi_w, pi_l, ref_w=None, ref_l=None, *, beta: float = 0.1) -> tuple[torch.Tensor, Metrics]:
    """ORPO (Hong et al. 2024, eq. 6-7), no reference model, lambda = beta:

    ``L = -log P(y_w) / |y_w| - lambda log sigmoid(log odds(y_w) - log odds(y_l))``,
    odds(y) = P(y) / (1 - P(y)), P(y) = exp(mean token log-prob); pi_w, pi_l (B,)
    are per-token means. Rewards are reported as beta * mean log-prob (as TRL).
    """
    ratio = log_odds(pi_w) - log_odds(pi_l)
    or_term = -F.logsigmoid(ratio)
    nll = -pi_w
    metrics = {"nll": nll.mean().detach(), "log_odds_ratio": ratio.mean().detach()}
    return (nll + beta * or_term).mean(), {**metrics, **_rewards(beta * pi_w, beta * pi_l)}


def chosen_nll(chosen_sums: torch.Tensor, chosen_counts: torch.Tensor) -> torch.Tensor:
    """Per-token NLL of the chosen responses, averaged per sequence then over the batch (B,) -> ().

    Added as ``nll_weight * chosen_nll`` to any loss (RPO, Pang et al. 2024, eq. 3).
    """
    return (-chosen_sums / chosen_counts.clamp(min=1)).mean()


@register_preference_loss("kto", paired=False)
def kto_loss(
    pi,
    ref,
    kl_pi,
    kl_ref,
    desirable,
    *,
    beta: float = 0.1,
    desirable_weight: float = 1.0,
    undesirable_weight: float = 1.0,
) -> tuple[torch.Tensor, Metrics]:
    """KTO (Ethayarajh et al. 2024, eq. 8) on unpaired examples:

    r = pi - ref (summed log-probs, (B,)); the reference point
    ``z0 = max(0, mean(kl_pi - kl_ref))`` is estimated on mismatched pairs (x_i, y_j), j != i,
    and detached;
    ``L = lambda_D (1 - sigmoid(beta (r - z0)))`` for desirable examples,
    ``L = lambda_U (1 - sigmoid(beta (z0 - r)))`` for undesirable ones, averaged over the batch.
    desirable: (B,) bool.
    """
    z0 = (kl_pi - kl_ref).mean().clamp(min=0).detach()
    r = pi - ref
    loss = torch.where(
        desirable,
        desirable_weight * (1 - torch.sigmoid(beta * (r - z0))),
        undesirable_weight * (1 - torch.sigmoid(beta * (z0 - r))),
    )
    rewards = (beta * r).detach()
    nan = torch.full((), math.nan, device=r.device)
    metrics = {
        "kl/reference_point": z0,
        "rewards/desirable": rewards[desirable].mean() if desirable.any() else nan,
        "rewards/undesirable": rewards[~desirable].mean() if (~desirable).any() else nan,
    }
    return loss.mean(), metrics
