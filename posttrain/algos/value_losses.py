"""The critic's loss for PPO: a pure tensor function (the value head lives in `posttrain.models.heads`)."""

from __future__ import annotations

import torch

from posttrain.algos.aggregate import AggMode, aggregate_loss

Metrics = dict[str, torch.Tensor]


def clipped_value_loss(
    values: torch.Tensor,
    old_values: torch.Tensor,
    returns: torch.Tensor,
    mask: torch.Tensor,
    *,
    clip_range: float | None = 0.2,
    agg: AggMode = "token-mean",
    norm: float = 1.0,
) -> tuple[torch.Tensor, Metrics]:
    """PPO value loss, optionally clipped (Schulman et al. 2017; as in OpenAI baselines ppo2).

    l_t = 1/2 max((V_t - R_t)^2, (V_old,t + clip(V_t - V_old,t, -c, c) - R_t)^2), or
    1/2 (V_t - R_t)^2 when clip_range is None. values (differentiable), old_values (the
    critic's values at rollout time), returns (the targets, e.g. GAE's), mask: (B, T).
    Loss = aggregate(l, mask, agg, norm). Metrics: clip_frac (tokens where the clipped term is
    larger), explained variance 1 - Var(R - V) / Var(R) over masked tokens.
    """
    err = (values - returns) ** 2
    if clip_range is None:
        loss_t, clip = err, torch.zeros_like(err, dtype=torch.bool)
    else:
        v_clip = old_values + torch.clamp(values - old_values, -clip_range, clip_range)
        err_clip = (v_clip - returns) ** 2
        loss_t, clip = torch.maximum(err, err_clip), err_clip > err
    loss = 0.5 * aggregate_loss(loss_t, mask, agg, norm=norm)
    m = mask.to(values.dtype)
    n = m.sum().clamp(min=1)
    v, r = values.detach(), returns.detach()
    var = lambda x: (((x - (x * m).sum() / n) * m) ** 2).sum() / n  # noqa: E731
    metrics = {
        "vf/clip_frac": aggregate_loss(clip.to(m.dtype), m, "token-mean"),
        "vf/values_mean": (v * m).sum() / n,
        "vf/explained_var": 1 - var(r - v) / var(r).clamp(min=1e-8),
    }
    return loss, metrics
