"""Policy-gradient losses: pure tensor functions, registered by name.

Every loss takes ``logp`` (B, T) = log pi_theta(y_t | y_<t) (differentiable), ``old_logp``
(B, T) = the same under the policy that sampled the batch (constants), ``advantages`` (B, T)
and ``mask`` (B, T) (1 on trained tokens), plus keyword hyper-parameters and the aggregation
``agg`` / ``norm`` of `posttrain.algos.aggregate.aggregate_loss`. It returns ``(loss, metrics)``
with detached metrics. GRPO, Dr.GRPO, RLOO and REINFORCE++ all use ``ppo_clip``; they differ in
their advantages and aggregation. Newer losses: ``gspo`` (sequence-level ratio), ``cispo``
(clipped, stop-gradient IS weight on REINFORCE), ``gmpo`` (geometric mean of token objectives),
``sapo`` (soft gate), ``dppo`` (trust region by divergence), ``kl_cov`` (KL on high-covariance
tokens). Every loss is positively homogeneous in ``advantages`` token by token, so a per-token
weight w >= 0 (rollout correction) is applied as ``advantages * w``.

When ``logp`` and ``old_logp`` are the same numbers (first mini-batch of the first epoch, the
old log-probs taken from the same weights) the ratio is exactly 1 and no token is clipped.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from posttrain.algos.aggregate import AggMode, aggregate_loss

Metrics = dict[str, torch.Tensor]
PolicyLossFn = Callable[..., tuple[torch.Tensor, Metrics]]
POLICY_LOSSES: dict[str, PolicyLossFn] = {}
SEQUENCE_LOSSES: set[str] = set()
"""Losses with one term per sequence (broadcast to its tokens): they read whole rows."""


def register_policy_loss(name: str, *, sequence: bool = False):
    """Decorator: add a loss under ``name`` (call convention in the module docstring).

    ``sequence=True``: the loss is one term per row (a per-sequence log-prob ratio)."""

    def wrap(fn: PolicyLossFn) -> PolicyLossFn:
        POLICY_LOSSES[name] = fn
        if sequence:
            SEQUENCE_LOSSES.add(name)
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


def _seq_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """(B, T) -> (B,) mean over each row's masked tokens (0 for a row with none)."""
    m = mask.to(x.dtype)
    return (x * m).sum(-1) / m.sum(-1).clamp(min=1)


@register_policy_loss("gspo", sequence=True)
def gspo_loss(
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    *,
    clip_low: float = 3e-4,
    clip_high: float = 4e-4,
    agg: AggMode = "seq-mean-token-mean",
    norm: float = 1.0,
) -> tuple[torch.Tensor, Metrics]:
    """GSPO (Zheng et al. 2025, eq. 5-7): one importance ratio per sequence.

    s_i = exp((1/|y_i|) sum_t (logp_it - old_logp_it)) (geometric mean of the token ratios, over
    masked tokens); l_it = -min(s_i A_it, clip(s_i, 1 - clip_low, 1 + clip_high) A_it) on every
    token of row i, aggregated by ``agg``. With A constant per row and seq-mean-token-mean this is
    the paper's J = 1/G sum_i min(s_i A_i, clip(s_i) A_i), gradient s_i A_i / |y_i| sum_t grad logp
    (the paper's clip range is ~3e-4 / 4e-4, not PPO's 0.2). Metrics over sequences.
    """
    s = torch.exp(_seq_mean(logp - old_logp, mask))[:, None]  # (B, 1)
    unclipped, clipped = -advantages * s, -advantages * torch.clamp(s, 1.0 - clip_low, 1.0 + clip_high)
    loss = aggregate_loss(torch.maximum(unclipped, clipped), mask, agg, norm=norm)
    rows = mask.sum(-1) > 0
    sd = s.detach()[:, 0][rows]
    return loss, {
        "pg/clip_frac": _mean((clipped > unclipped).float(), mask),
        "pg/seq_ratio_mean": sd.mean() if sd.numel() else sd.new_zeros(()),
        "pg/seq_ratio_max": sd.max() if sd.numel() else sd.new_zeros(()),
    }


@register_policy_loss("cispo")
def cispo_loss(
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    *,
    clip_low: float = 1.0,
    clip_high: float = 4.0,
    agg: AggMode = "token-mean",
    norm: float = 1.0,
) -> tuple[torch.Tensor, Metrics]:
    """CISPO (MiniMax-M1, Chen et al. 2025, eq. 4-5): REINFORCE on every token with a clipped,
    stop-gradient importance weight.

    w_t = sg(clip(rho_t, 1 - clip_low, 1 + clip_high)), rho_t = exp(logp_t - old_logp_t);
    l_t = -w_t A_t logp_t. No token is dropped (PPO's clip zeroes the gradient of clipped
    tokens; here they keep a bounded weight). clip_low >= 1 = no lower bound (the paper's
    setting). Metrics: clip_frac (tokens whose weight was capped), ratio mean/max.
    """
    ratio = torch.exp(logp - old_logp)
    weight = torch.clamp(ratio, 1.0 - clip_low, 1.0 + clip_high).detach()
    loss = aggregate_loss(-weight * advantages * logp, mask, agg, norm=norm)
    capped = (ratio.detach() > 1.0 + clip_high) | (ratio.detach() < 1.0 - clip_low)
    return loss, {
        "pg/clip_frac": _mean(capped.float(), mask),
        "pg/ratio_mean": _mean(ratio, mask),
        "pg/ratio_max": (ratio.detach() * mask).max(),
    }


@register_policy_loss("gmpo", sequence=True)
def gmpo_loss(
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    *,
    clip_low: float = 0.4,
    clip_high: float = 0.4,
    agg: AggMode = "seq-mean-token-mean",
    norm: float = 1.0,
) -> tuple[torch.Tensor, Metrics]:
    """GMPO (Zhao et al. 2025, eq. 7): the geometric mean of the token-level clipped objectives.

    With a_i = sign(A_i), A_i = mean of the row's masked advantages and clipping in log space:
    g_it = a_i * min(a_i (logp_it - old_logp_it), a_i clip(logp_it - old_logp_it, -clip_low, clip_high));
    l_i = -A_i exp((1/|y_i|) sum_t g_it) = -sign(A_i) prod_t min(rho_it |A_i|, clip(rho_it) |A_i|)^(1/|y_i|).
    l_i is put on every token of row i and aggregated by ``agg`` (seq-mean-token-mean = the paper's
    1/G sum_i). Clip range: rho in [e^-clip_low, e^clip_high] (paper: 0.4).
    """
    log_ratio = logp - old_logp
    adv = _seq_mean(advantages, mask)[:, None]
    sign = torch.sign(adv)
    clipped = torch.clamp(log_ratio, -clip_low, clip_high)
    g = sign * torch.minimum(sign * log_ratio, sign * clipped)
    loss_seq = -adv * torch.exp(_seq_mean(g, mask))[:, None]
    loss = aggregate_loss(loss_seq.expand_as(logp), mask, agg, norm=norm)
    return loss, {
        "pg/clip_frac": _mean((sign * clipped < sign * log_ratio).float(), mask),
        "pg/ratio_mean": _mean(torch.exp(log_ratio), mask),
    }


@register_policy_loss("sapo")
def sapo_loss(
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    *,
    tau_pos: float = 1.0,
    tau_neg: float = 1.05,
    agg: AggMode = "seq-mean-token-mean",
    norm: float = 1.0,
) -> tuple[torch.Tensor, Metrics]:
    """SAPO (Gao et al. 2025, eq. 6): a smooth, temperature-controlled gate instead of a hard clip.

    f(rho) = (4 / tau) sigmoid(tau (rho - 1)), tau = tau_pos if A_t > 0 else tau_neg;
    l_t = -f(rho_t) A_t. At rho = 1, df/drho = 1 (the on-policy gradient is REINFORCE's); far from
    1 the gradient decays smoothly (weight 4 s (1 - s), s = sigmoid(tau (rho - 1))) rather than
    dropping to 0 at a clip edge. A larger tau_neg damps negative tokens faster.
    """
    ratio = torch.exp(logp - old_logp)
    tau = torch.full_like(ratio, tau_neg).masked_fill(advantages > 0, tau_pos)
    gate = torch.sigmoid(tau * (ratio - 1.0))
    loss = aggregate_loss(-(4.0 / tau) * gate * advantages, mask, agg, norm=norm)
    g = gate.detach()
    return loss, {
        "pg/gate_weight_mean": _mean(4.0 * g * (1.0 - g), mask),
        "pg/ratio_mean": _mean(ratio, mask),
        "pg/ratio_max": (ratio.detach() * mask).max(),
    }


@register_policy_loss("dppo")
def dppo_loss(
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    *,
    delta: float = 0.15,
    divergence: str = "tv",
    agg: AggMode = "token-mean",
    norm: float = 1.0,
) -> tuple[torch.Tensor, Metrics]:
    """DPPO: a trust region on the policy divergence instead of the probability ratio
    ("Rethinking the trust region in LLM RL", its binary TV / KL approximations).

    With p = pi_theta(y_t), q = pi_old(y_t) the sampled token's probabilities, the divergence is
    D_t = |p - q| (``tv``) or q log(q/p) + (1 - q) log((1 - q)/(1 - p)) (``kl``, Bernoulli KL).
    l_t = -M_t rho_t A_t with M_t = 0 when the token left the region in the direction its
    advantage pushes it (A_t > 0 and rho_t > 1, or A_t < 0 and rho_t < 1) and D_t > delta, else 1.
    Unlike the ratio clip, a rare token (q small) may move by a large ratio at a small divergence.
    """
    ratio = torch.exp(logp - old_logp)
    p, q = torch.exp(logp.detach()), torch.exp(old_logp.detach())
    if divergence == "tv":
        div = (p - q).abs()
    elif divergence == "kl":
        p, q = p.clamp(1e-12, 1 - 1e-7), q.clamp(1e-12, 1 - 1e-7)
        div = q * torch.log(q / p) + (1 - q) * torch.log((1 - q) / (1 - p))
    else:
        raise ValueError(f"unknown DPPO divergence {divergence!r}; valid: tv, kl")
    away = ((advantages > 0) & (ratio.detach() > 1)) | ((advantages < 0) & (ratio.detach() < 1))
    keep = ~(away & (div > delta))
    loss = aggregate_loss(-keep.to(ratio.dtype) * ratio * advantages, mask, agg, norm=norm)
    return loss, {
        "pg/clip_frac": _mean((~keep).float(), mask),
        "pg/divergence_mean": _mean(div, mask),
        "pg/ratio_mean": _mean(ratio, mask),
    }


@register_policy_loss("kl_cov")
def kl_cov_loss(
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    *,
    cov_frac: float = 0.002,
    cov_coef: float = 1.0,
    agg: AggMode = "token-mean",
    norm: float = 1.0,
) -> tuple[torch.Tensor, Metrics]:
    """KL-Cov (Cui et al. 2025, "The entropy mechanism of RL for reasoning LMs", eq. 12).

    Cov_t = (logp_t - mean(logp)) (A_t - mean(A)), means over the batch's masked tokens (the
    entropy of a token falls when its log-prob and advantage move together). The
    ceil(cov_frac * N) masked tokens with the largest Cov_t get a KL penalty:
    l_t = -rho_t A_t + cov_coef |logp_t - old_logp_t| on them, -rho_t A_t elsewhere. The
    selection is over the batch the function sees, so it changes with micro-batching.
    """
    m = mask.bool()
    lp = logp.detach()
    cov = (lp - lp[m].mean()) * (advantages - advantages[m].mean())
    k = min(int(m.sum()), max(1, math.ceil(cov_frac * int(m.sum()))))
    picked = torch.zeros_like(m)
    if k:
        top = torch.topk(cov.masked_fill(~m, -torch.inf).flatten(), k).indices
        picked.view(-1)[top] = True
    ratio = torch.exp(logp - old_logp)
    loss_t = -ratio * advantages + picked * cov_coef * (logp - old_logp).abs()
    loss = aggregate_loss(loss_t, mask, agg, norm=norm)
    return loss, {"pg/cov_selected_frac": _mean(picked.float(), mask), "pg/ratio_mean": _mean(ratio, mask)}
