"""Knowledge-distillation losses: forward KL, reverse KL and generalised JSD, per token.

Per token, with teacher logits z_t, student logits z_s over the vocabulary V and temperature tau:
p = softmax(z_t / tau) (teacher), q = softmax(z_s / tau) (student).

- forward KL  ``KL(p || q) = sum_v p_v (log p_v - log q_v)`` (Hinton et al. 2015; mean-seeking:
  the student covers all of the teacher's mass; what "logit KD" usually means);
- reverse KL  ``KL(q || p) = sum_v q_v (log q_v - log p_v)`` (mode-seeking; MiniLLM, and GKD's
  on-policy objective);
- generalised JSD (Agarwal et al. 2024, GKD, section 3.1): ``m = beta p + (1 - beta) q``,
  ``JSD_beta = beta KL(p || m) + (1 - beta) KL(q || m)``. beta weights the teacher, as in TRL's
  ``GKDTrainer.generalized_jsd_loss``. JSD_beta itself tends to 0 at both ends, but
  ``JSD_beta / beta -> KL(p || q)`` as beta -> 0 and ``JSD_beta / (1 - beta) -> KL(q || p)`` as
  beta -> 1 (GKD: "behaves like forward / reverse KL"), so, as TRL does, beta = 0 is defined as
  the forward KL and beta = 1 as the reverse KL exactly.

Temperature divides both logits; there is no tau^2 factor (TRL's GKD convention; Hinton et al.
multiply by tau^2 to keep gradient magnitudes across tau -- scale the loss yourself for that).

Top-k teacher (`topk_token_divergence`): the teacher is known only by its k most likely tokens,
indices (..., k) and log-probs (..., k) (at tau = 1, e.g. read from a cache). Both distributions
are renormalised over that support S: ``p~ = softmax(log p_S / tau)``, ``q~ = softmax(z_s[S] / tau)``,
and the divergence is taken between p~ and q~ on S. With k = V this is exactly the full loss;
with k < V the student's mass outside S gets no gradient (it is neither pushed up nor down).
Since log p_S / tau differs from z_t[S] / tau by a constant, tau = 1 log-probs serve every tau.

Teacher inputs are detached everywhere: gradients reach the student only.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Literal

import torch
import torch.nn.functional as F

from posttrain.algos.aggregate import AggMode, aggregate_loss

DistillKind = Literal["forward_kl", "reverse_kl", "jsd"]
DISTILL_KINDS: tuple[str, ...] = ("forward_kl", "reverse_kl", "jsd")
Metrics = dict[str, torch.Tensor]


def _kl(logp: torch.Tensor, logq: torch.Tensor) -> torch.Tensor:
    """KL(P || Q) over the last dim from normalised log-probs; 0 * log 0 = 0."""
    return F.kl_div(logq, logp, reduction="none", log_target=True).sum(-1)


def divergence(student_logp: torch.Tensor, teacher_logp: torch.Tensor, kind: DistillKind, beta: float = 0.5):
    """Per-token divergence (...,) between normalised log-probs (..., V) (module docstring).

    kind: forward_kl = KL(p || q) | reverse_kl = KL(q || p) | jsd = beta KL(p || m) + (1 - beta) KL(q || m),
    m = beta p + (1 - beta) q; jsd with beta = 0 / 1 is the forward / reverse KL.
    """
    t = teacher_logp.detach()
    if kind == "forward_kl" or (kind == "jsd" and beta == 0.0):
        return _kl(t, student_logp)
    if kind == "reverse_kl" or (kind == "jsd" and beta == 1.0):
        return _kl(student_logp, t)
    if kind != "jsd":
        raise ValueError(f"unknown distillation loss {kind!r}; valid: {', '.join(DISTILL_KINDS)}")
    if not 0.0 < beta < 1.0:
        raise ValueError(f"jsd beta must be in [0, 1], got {beta}")
    log_m = torch.logsumexp(torch.stack([t + math.log(beta), student_logp + math.log1p(-beta)]), dim=0)
    return beta * _kl(t, log_m) + (1.0 - beta) * _kl(student_logp, log_m)


def token_divergence(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    *,
    kind: DistillKind = "forward_kl",
    beta: float = 0.5,
    temperature: float = 1.0,
) -> torch.Tensor:
    """Per-token divergence (...,) of full-vocabulary logits (..., V), both divided by ``temperature``.

    Computed in float32 whatever the input dtype.
    """
    s = torch.log_softmax(student_logits.float() / temperature, dim=-1)
    t = torch.log_softmax(teacher_logits.detach().float() / temperature, dim=-1)
    return divergence(s, t, kind, beta)


def topk_token_divergence(
    student_logits: torch.Tensor,
    teacher_indices: torch.Tensor,
    teacher_logprobs: torch.Tensor,
    *,
    kind: DistillKind = "forward_kl",
    beta: float = 0.5,
    temperature: float = 1.0,
) -> torch.Tensor:
    """Per-token divergence (...,) against a top-k teacher, both renormalised over the k tokens.

    student_logits (..., V); teacher_indices (..., k) long; teacher_logprobs (..., k) the teacher's
    log-probs of those tokens (any temperature-1 normalisation: a constant shift cancels).
    """
    picked = student_logits.float().gather(-1, teacher_indices.long())
    s = torch.log_softmax(picked / temperature, dim=-1)
    t = torch.log_softmax(teacher_logprobs.detach().float() / temperature, dim=-1)
    return divergence(s, t, kind, beta)


def _metrics(per_token: torch.Tensor, mask: torch.Tensor, kind: str) -> Metrics:
    return {f"distill/{kind}_token_mean": aggregate_loss(per_token.detach(), mask, "token-mean")}


def distill_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    mask: torch.Tensor,
    *,
    kind: DistillKind = "forward_kl",
    beta: float = 0.5,
    temperature: float = 1.0,
    agg: AggMode = "token-mean",
    norm: float = 1.0,
) -> tuple[torch.Tensor, Metrics]:
    """L = aggregate_{mask, agg}(D_kind(p_t || q_s)) over logits (B, T, V), mask (B, T) 0/1.

    D_kind per token as in `divergence`; aggregation by `posttrain.algos.aggregate.aggregate_loss`.
    """
    per_token = token_divergence(
        student_logits, teacher_logits, kind=kind, beta=beta, temperature=temperature
    )
    return aggregate_loss(per_token, mask, agg, norm=norm), _metrics(per_token, mask, kind)


def forward_kl_loss(student_logits, teacher_logits, mask, **kw) -> tuple[torch.Tensor, Metrics]:
    """L = aggregate(KL(p_teacher || q_student)); logits (B, T, V), mask (B, T); see `distill_loss`."""
    return distill_loss(student_logits, teacher_logits, mask, kind="forward_kl", **kw)


def reverse_kl_loss(student_logits, teacher_logits, mask, **kw) -> tuple[torch.Tensor, Metrics]:
    """L = aggregate(KL(q_student || p_teacher)); logits (B, T, V), mask (B, T); see `distill_loss`."""
    return distill_loss(student_logits, teacher_logits, mask, kind="reverse_kl", **kw)


def jsd_loss(
    student_logits, teacher_logits, mask, *, beta: float = 0.5, **kw
) -> tuple[torch.Tensor, Metrics]:
    """L = aggregate(beta KL(p || m) + (1 - beta) KL(q || m)), m = beta p + (1 - beta) q (GKD eq. 1)."""
    return distill_loss(student_logits, teacher_logits, mask, kind="jsd", beta=beta, **kw)


def topk_distill_loss(
    student_logits: torch.Tensor,
    teacher_indices: torch.Tensor,
    teacher_logprobs: torch.Tensor,
    mask: torch.Tensor,
    *,
    kind: DistillKind = "forward_kl",
    beta: float = 0.5,
    temperature: float = 1.0,
    agg: AggMode = "token-mean",
    norm: float = 1.0,
) -> tuple[torch.Tensor, Metrics]:
    """L = aggregate(D_kind(p~ || q~)) with p~, q~ renormalised over the teacher's top-k (module docstring).

    student_logits (B, T, V); teacher_indices, teacher_logprobs (B, T, k); mask (B, T) 0/1.
    """
    per_token = topk_token_divergence(
        student_logits, teacher_indices, teacher_logprobs, kind=kind, beta=beta, temperature=temperature
    )
    return aggregate_loss(per_token, mask, agg, norm=norm), _metrics(per_token, mask, kind)


LOSSES: dict[str, Callable[..., tuple[torch.Tensor, Metrics]]] = {
    "forward_kl": forward_kl_loss,
    "reverse_kl": reverse_kl_loss,
    "jsd": jsd_loss,
}
