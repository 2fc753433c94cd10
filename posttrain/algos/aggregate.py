"""The one loss-aggregation function every trainer uses.

Modes (names follow verl/Dr.GRPO usage):
- ``token-mean``: sum of all token losses / number of loss tokens in the batch.
- ``seq-mean-token-mean``: mean over sequences of each sequence's token mean.
- ``seq-mean-token-sum``: mean over sequences of each sequence's token sum,
  divided by a constant ``norm`` (e.g. the max generation length, Dr.GRPO).

Aggregation is expressed as per-token weights so the same weights can be fed to
a fused loss kernel that never materialises per-token losses twice.
"""

from __future__ import annotations

from typing import Literal

import torch

AggMode = Literal["token-mean", "seq-mean-token-mean", "seq-mean-token-sum"]
AGG_MODES: tuple[str, ...] = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum")


def token_weights(
    seq_ids: torch.Tensor,
    mode: AggMode,
    *,
    num_tokens: float | None = None,
    num_seqs: float | None = None,
    norm: float = 1.0,
) -> torch.Tensor:
    """Per-token weights w such that ``sum(w * loss_tok)`` is the aggregated loss.

    seq_ids: (N,) int, the sequence each loss token belongs to (any labels, need
        not be contiguous). num_tokens / num_seqs: global counts to divide by
        (default: the counts in ``seq_ids``); pass the totals over all
        micro-batches of an accumulation step so accumulated gradients equal
        the gradient of the full batch.
    Returns (N,) float32.
    """
    if mode not in AGG_MODES:
        raise ValueError(f"unknown loss aggregation {mode!r}; valid: {', '.join(AGG_MODES)}")
    n = seq_ids.numel()
    if mode == "token-mean":
        denom = num_tokens if num_tokens is not None else max(n, 1)
        return torch.full((n,), 1.0 / denom, dtype=torch.float32, device=seq_ids.device)
    _, inverse, counts = torch.unique(seq_ids, return_inverse=True, return_counts=True)
    seqs = num_seqs if num_seqs is not None else max(counts.numel(), 1)
    if mode == "seq-mean-token-mean":
        return (1.0 / counts.float())[inverse] / seqs
    return torch.full((n,), 1.0 / (seqs * norm), dtype=torch.float32, device=seq_ids.device)


def aggregate_loss(
    loss: torch.Tensor, mask: torch.Tensor, mode: AggMode, *, norm: float = 1.0
) -> torch.Tensor:
    """Aggregate a (B, T) per-token loss under a (B, T) 0/1 mask; rows are sequences."""
    mask = mask.to(loss.dtype)
    if mode == "token-mean":
        return (loss * mask).sum() / mask.sum().clamp(min=1)
    if mode == "seq-mean-token-mean":
        per_seq = (loss * mask).sum(-1) / mask.sum(-1).clamp(min=1)
        return per_seq.mean()
    if mode == "seq-mean-token-sum":
        return ((loss * mask).sum(-1) / norm).mean()
    raise ValueError(f"unknown loss aggregation {mode!r}; valid: {', '.join(AGG_MODES)}")
