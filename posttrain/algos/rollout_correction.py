"""Trainer / sampler mismatch: how far the rollout engine's log-probs are from the trainer's, and
the importance weights that correct for it.

The sampler (a bf16 engine, vLLM, a top-p-truncated kernel) and the trainer score the same tokens
differently even at the same weights: log pi_sampler(y_t) != log pi_trainer(y_t). The policy
gradient is then taken on samples from another policy. With d_t = trainer_logp_t -
sampler_logp_t over a row's masked tokens, the importance ratio of the trainer to the sampler is

- token level: w_t = exp(d_t);
- sequence level: w_i = exp(sum_t d_t) (the exact ratio of the sequence's probabilities);
- geometric: w_i = exp(mean_t d_t) (length-normalised, as GSPO's ratio).

Correction (Yao et al. 2025, "Your efficient RL framework secretly brings you off-policy RL
training"; verl's rollout correction): ``truncate`` (TIS) uses min(w, cap); ``mask`` (masked IS)
uses w where w <= cap and drops the token (or sequence) otherwise. The weight multiplies each
token's policy loss (a constant: no gradient flows through it). All tensors are (B, T).
"""

from __future__ import annotations

from typing import Literal

import torch

Metrics = dict[str, torch.Tensor]
CorrectionLevel = Literal["token", "sequence", "geometric"]
CorrectionMode = Literal["truncate", "mask"]
LEVELS: tuple[str, ...] = ("token", "sequence", "geometric")
MODES: tuple[str, ...] = ("truncate", "mask")
BAND = (0.8, 1.25)
"""Token IS ratios outside this band are counted in ``mismatch/ratio_outside_frac``."""


def mismatch_metrics(trainer_logp: torch.Tensor, sampler_logp: torch.Tensor, mask: torch.Tensor) -> Metrics:
    """Log-prob gap between trainer and sampler on the same tokens, token and sequence level.

    Token: mean |d_t|, mean d_t, IS ratio exp(d_t) mean / max / share outside [0.8, 1.25], and
    the k3 estimate of KL(sampler || trainer) per token. Sequence: mean |sum_t d_t| and the
    largest sequence ratio exp(sum_t d_t). Inputs are detached; a batch with no masked token gives 0s.
    """
    m = mask.bool()
    d = (trainer_logp.detach() - sampler_logp.detach()).double().masked_fill(~m, 0.0)
    n = m.sum().clamp(min=1)
    ratio = torch.exp(d)
    outside = ((ratio < BAND[0]) | (ratio > BAND[1])) & m
    seq = d.sum(-1)[m.any(-1)]
    zero = d.new_zeros(())
    return {
        "mismatch/token_abs_diff_mean": d.abs().sum() / n,
        "mismatch/token_diff_mean": d.sum() / n,
        "mismatch/ratio_mean": (ratio * m).sum() / n,
        "mismatch/ratio_max": ratio.masked_fill(~m, 0.0).max() if m.any() else zero,
        "mismatch/ratio_outside_frac": outside.sum() / n,
        "mismatch/k3_kl": ((ratio - 1 - d) * m).sum()
        / n,  # d = log(trainer / sampler), samples from the sampler
        "mismatch/seq_abs_diff_mean": seq.abs().mean() if seq.numel() else zero,
        "mismatch/seq_ratio_max": torch.exp(seq).max() if seq.numel() else zero,
    }


def correction_weights(
    trainer_logp: torch.Tensor,
    sampler_logp: torch.Tensor,
    mask: torch.Tensor,
    *,
    level: CorrectionLevel = "token",
    mode: CorrectionMode = "truncate",
    cap: float = 2.0,
) -> tuple[torch.Tensor, Metrics]:
    """Importance weights (B, T) >= 0 of the trainer w.r.t. the sampler (module docstring), detached.

    Returns (weights, metrics): the mean weight and the share of masked tokens whose weight was
    truncated or masked. ``cap`` must be > 1 (a cap <= 1 would truncate every on-policy token).
    """
    if cap <= 1:
        raise ValueError(f"correction cap must be > 1, got {cap}")
    m = mask.bool()
    d = (trainer_logp.detach() - sampler_logp.detach()).masked_fill(~m, 0.0)
    if level == "token":
        log_w = d
    elif level == "sequence":
        log_w = d.sum(-1, keepdim=True).expand_as(d)
    elif level == "geometric":
        log_w = (d.sum(-1) / m.sum(-1).clamp(min=1))[:, None].expand_as(d)
    else:
        raise ValueError(f"unknown correction level {level!r}; valid: {', '.join(LEVELS)}")
    w = torch.exp(log_w.clamp(max=80.0))
    over = w > cap
    if mode == "truncate":
        w = w.clamp(max=cap)
    elif mode == "mask":
        w = w.masked_fill(over, 0.0)
    else:
        raise ValueError(f"unknown correction mode {mode!r}; valid: {', '.join(MODES)}")
    n = m.sum().clamp(min=1)
    w = w * m
    return w, {"correction/weight_mean": w.sum() / n, "correction/capped_frac": (over & m).sum() / n}
