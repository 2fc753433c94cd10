"""Reward-model losses and metrics: pure tensor functions (torch only).

Outcome RM (one scalar reward per response):
- `bradley_terry_loss`: ``-log sigmoid(r+ - r- - m)`` (Bradley-Terry; margin m as in Llama 2).
- `plackett_luce_loss`: ``-sum_l log(exp r_l / sum_{k>=l} exp r_k)`` over a ranking (best first);
  for two items it is exactly Bradley-Terry without margin.
- `ranking_pairs`: every (better, worse) pair of a ranking, for Bradley-Terry on rankings.

Process RM (one logit per reasoning step, read at the step-end token):
- `prm_bce_loss`: binary cross-entropy with hard or soft labels, weighted per step.
- `grouped_pair_loss`: Bradley-Terry between steps of one group (the same question and step
  index) whose labels differ: the PRM must rank a question's right step above its wrong one,
  not only learn which questions are hard.

Metrics (detached tensors): `pairwise_accuracy`, `kendall_tau`, `step_metrics`
(step accuracy, F1 of the wrong-step class, first-error-step accuracy, `step_auc`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

# Masked-out rewards: exp(this - max) underflows to exactly 0, and it stays finite (no nan grads).
_MASKED = -1e30


def bradley_terry_loss(
    chosen: torch.Tensor, rejected: torch.Tensor, margin: torch.Tensor | float = 0.0
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Pairwise Bradley-Terry loss, mean over pairs.

    loss = mean_i -log sigmoid(r+_i - r-_i - m_i)

    chosen, rejected: (P,) rewards of the preferred and the other response.
    margin: (P,) or a scalar; how much r+ should exceed r- (0 = plain BT).
    Metrics: accuracy (r+ > r-), margin (mean r+ - r-), chosen / rejected mean rewards.
    """
    diff = chosen - rejected
    loss = -F.logsigmoid(diff - margin).mean()
    d = diff.detach()
    metrics = {
        "accuracy": (d > 0).float().mean(),
        "margin": d.mean(),
        "chosen": chosen.detach().mean(),
        "rejected": rejected.detach().mean(),
    }
    return loss, metrics


def plackett_luce_loss(
    rewards: torch.Tensor, mask: torch.Tensor | None = None
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Listwise Plackett-Luce loss of full rankings, mean over rankings.

    loss_b = -sum_{l} [ r_l - log sum_{k >= l} exp r_k ]   (items in ranking order, best first)

    rewards: (B, K) rewards with column 0 the best item. mask: (B, K) bool, True for real
    items (rankings of different lengths are padded; any pattern works). Padded items enter
    no sum. The last real item's term is 0. With K = 2 this equals `bradley_terry_loss`.
    """
    if mask is None:
        mask = torch.ones_like(rewards, dtype=torch.bool)
    r = rewards.float().masked_fill(~mask, _MASKED)
    tail = torch.logcumsumexp(r.flip(-1), dim=-1).flip(-1)  # log sum_{k >= l} exp r_k
    terms = (r - tail) * mask
    loss = -terms.sum(-1).mean()
    return loss, {"nll_per_item": -terms.detach().sum() / mask.sum().clamp(min=1)}


def ranking_pairs(rewards: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """All (better, worse) reward pairs of rankings: ((P,), (P,)).

    rewards, mask: (B, K) in ranking order (best first); pair (i, j) with i < j, both real.
    """
    k = rewards.shape[-1]
    i, j = torch.triu_indices(k, k, offset=1, device=rewards.device)
    valid = mask[:, i] & mask[:, j]
    return rewards[:, i][valid], rewards[:, j][valid]


def pairwise_accuracy(rewards: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Share of ranked pairs (better, worse) whose rewards are strictly in order; rewards, mask (B, K)."""
    better, worse = ranking_pairs(rewards.detach(), mask)
    return (better > worse).float().mean() if better.numel() else better.new_zeros(())


def kendall_tau(rewards: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean Kendall tau-a between rewards and the true ranking, over rankings with >= 2 items.

    tau_b = (concordant - discordant) / pairs, where column order is the true order (best
    first) and ties count as neither. rewards, mask: (B, K). Pairs -> 2 * accuracy - 1.
    """
    k = rewards.shape[-1]
    i, j = torch.triu_indices(k, k, offset=1, device=rewards.device)
    valid = (mask[:, i] & mask[:, j]).float()
    sign = torch.sign(rewards.detach()[:, i] - rewards.detach()[:, j]) * valid
    n_pairs = valid.sum(-1)
    has = n_pairs > 0
    return (sign.sum(-1)[has] / n_pairs[has]).mean()


def prm_bce_loss(
    logits: torch.Tensor, labels: torch.Tensor, weights: torch.Tensor
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Process-reward loss: binary cross-entropy at step-end positions.

    loss = sum_n w_n * BCE(sigmoid(z_n), y_n),  BCE = -y log p - (1 - y) log(1 - p)

    logits: (N,) one logit z per scored step. labels: (N,) y in [0, 1] (1 = correct step;
    soft values such as Monte-Carlo estimates work too). weights: (N,) aggregation weights
    (`posttrain.algos.aggregate.token_weights` over the steps' sequence ids).
    """
    bce = F.binary_cross_entropy_with_logits(logits.float(), labels.float(), reduction="none")
    loss = (bce * weights).sum()
    return loss, {"bce_sum": bce.detach().sum(), "steps": torch.tensor(float(labels.numel()))}


def grouped_pair_loss(
    logits: torch.Tensor, labels: torch.Tensor, groups: torch.Tensor
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Within-group Bradley-Terry over every pair of steps with different labels.

    loss = sum_{i,j: g_i = g_j >= 0, y_i > y_j} (y_i - y_j) * -log sigmoid(z_i - z_j)
           / sum of the same weights (y_i - y_j)

    logits, labels: (N,) step logits and hard or soft labels; groups: (N,) group id of each step
    (-1 = in no group). Soft labels weight a pair by its label gap. With no pair the loss is 0
    (still attached to the graph). Metrics: pairs (count), pair_acc (z_i > z_j, ties half).
    """
    same = (groups[:, None] == groups[None, :]) & (groups[:, None] >= 0)
    weight = (labels[:, None] - labels[None, :]).clamp(min=0) * same
    diff = logits[:, None] - logits[None, :]
    total = weight.sum()
    loss = (weight * -F.logsigmoid(diff)).sum() / total.clamp(min=1e-12)
    d = diff.detach()
    hit = (d > 0).float() + 0.5 * (d == 0).float()
    metrics = {"pairs": (weight > 0).sum().float(), "pair_acc": (hit * weight).sum() / total.clamp(min=1e-12)}
    return loss, metrics


def step_auc(probs: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Area under the ROC curve: P(p of a correct step > p of a wrong step), labels at 0.5.

    Mann-Whitney form (AUC = (R+ - n+(n+ + 1)/2) / (n+ n-), R+ = rank sum of the correct
    steps; ties broken by order). 0.5 = no separation; nan without both classes.
    """
    good = labels >= 0.5
    ranks = torch.empty_like(probs).scatter_(
        0,
        probs.detach().argsort(),
        torch.arange(1, probs.numel() + 1, dtype=probs.dtype, device=probs.device),
    )
    n_pos, n_neg = good.sum(), (~good).sum()
    return (ranks[good].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg)


def step_metrics(probs: torch.Tensor, labels: torch.Tensor, seq: torch.Tensor) -> dict[str, torch.Tensor]:
    """Step accuracy, F1 of the wrong-step class, first-error-step accuracy and step AUC.

    probs, labels: (N,) predicted P(correct) and labels (thresholded at 0.5), steps of each
    chain contiguous and in order; seq: (N,) chain id of each step. A chain's first error is
    its first step below 0.5, or "none"; first_error_acc counts chains where the predicted
    and the true first error agree (correct chains must be predicted error-free).
    """
    pred_ok, true_ok = probs.detach() >= 0.5, labels >= 0.5
    tp = (~pred_ok & ~true_ok).sum().float()
    f1 = 2 * tp / ((~pred_ok).sum() + (~true_ok).sum()).clamp(min=1)
    _, inverse, counts = torch.unique_consecutive(seq, return_inverse=True, return_counts=True)
    starts = torch.cumsum(counts, 0) - counts
    index = torch.arange(seq.numel(), device=seq.device) - starts[inverse]
    none = torch.full_like(counts, seq.numel())

    def first(ok: torch.Tensor) -> torch.Tensor:
        return none.scatter_reduce(0, inverse, torch.where(ok, none[inverse], index), "amin")

    first_acc = (first(pred_ok) == first(true_ok)).float().mean()
    return {
        "step_acc": (pred_ok == true_ok).float().mean(),
        "step_f1": f1,
        "first_error_acc": first_acc,
        "step_auc": step_auc(probs, labels),
    }
