"""Logit distillation: the batch plan over fixed samples and the distillation step used by
`posttrain.train.loop.run_loop` (logit and on-policy modes share the step).

One optimiser step: for every micro-batch, the student's logits at the trained positions
(N, V), the teacher's (in memory, no grad) or its cached top-k rows, the per-token divergence
(`posttrain.algos.distill_losses`), weighted by `posttrain.algos.aggregate.token_weights` with
the totals of the whole accumulation step (so accumulation equals the full-batch gradient).
On several ranks each takes its rows of every micro-batch (`shard_rows`: the teacher runs on
them, or their cached top-k rows come along), the totals are all-reduced and the loss scaled by
the world size, so DDP's gradient average is the one-process gradient (`posttrain.distributed.parallel`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from posttrain.algos.aggregate import token_weights
from posttrain.algos.distill_losses import token_divergence, topk_token_divergence
from posttrain.data.collate import bucket_batches, pad_collate
from posttrain.data.render import Sample
from posttrain.distributed.parallel import all_reduce_sum, call, grad_sync, rank, shard_micro, world
from posttrain.train.distill.config import DistillLossConfig
from posttrain.train.distill.teacher import TopK, labelled_logits
from posttrain.train.lm_loss import loss_targets
from posttrain.train.loop import LoopConfig, StepFn
from posttrain.train.precision import autocast


class SamplePlan:
    """Padded, length-bucketed micro-batches of fixed samples; epoch e's order depends only on
    (seed, e), so a resumed run replays the same batches. With a `TopK` cache each batch also
    carries ``topk_idx`` / ``topk_logp`` (N, k): the teacher's rows of its trained positions."""

    def __init__(
        self, samples: list[Sample], batch_size: int, pad_id: int, seed: int, topk: TopK | None = None
    ):
        self.samples, self.batch_size, self.pad_id, self.seed, self.topk = (
            samples,
            batch_size,
            pad_id,
            seed,
            topk,
        )
        self._cache: dict[int, list] = {}

    def epoch(self, e: int) -> list[dict[str, torch.Tensor]]:
        if e not in self._cache:
            self._cache = {e: self._build(e)}
        return self._cache[e]

    def _build(self, e: int) -> list[dict[str, torch.Tensor]]:
        lengths = [len(s.input_ids) for s in self.samples]
        out = []
        for ids in bucket_batches(lengths, self.batch_size, seed=self.seed * 1000003 + e):
            batch = pad_collate([self.samples[i] for i in ids], self.pad_id)
            if self.topk is not None:
                batch["topk_idx"], batch["topk_logp"] = self.topk.rows(ids)
            out.append(batch)
        return out

    def __len__(self) -> int:
        return len(self.epoch(0))


TOPK_KEYS = ("topk_idx", "topk_logp")
"""Per-position (N, k) tensors of a batch: one row per trained position, row-major."""


def shard_rows(batch: dict[str, torch.Tensor], r: int, w: int) -> tuple[dict[str, torch.Tensor], bool]:
    """Rank r's rows of a global micro-batch (`shard_micro`) with their cached top-k rows: the
    (N, k) tensors keep the trained positions of those rows (none for a stand-in row)."""
    per_row = {k: v for k, v in batch.items() if k not in TOPK_KEYS}
    local, real = shard_micro(per_row, r, w)
    if TOPK_KEYS[0] not in batch:
        return local, real
    counts = loss_targets(batch)[0].sum(1)
    ends = counts.cumsum(0)
    rows = torch.tensor_split(torch.arange(counts.numel()), w)[r] if real else []
    keep = [torch.arange(int(ends[i] - counts[i]), int(ends[i])) for i in rows]
    keep = torch.cat(keep) if keep else torch.zeros(0, dtype=torch.long)
    return {**local, **{k: batch[k][keep] for k in TOPK_KEYS}}, real


def step_totals(micro: list[dict[str, torch.Tensor]]) -> tuple[float, float]:
    """Trained tokens and sequences over all micro-batches of one optimiser step (over all
    ranks' shards when each rank passes its own)."""
    tokens = sum(int(loss_targets(b)[0].sum()) for b in micro)
    seqs = sum(int(torch.unique(loss_targets(b)[2]).numel()) for b in micro)
    tokens, seqs = all_reduce_sum([tokens, seqs])
    return float(max(tokens, 1)), float(max(seqs, 1))


def make_step(teacher: torch.nn.Module | None, loss: DistillLossConfig, vocab: int) -> StepFn:
    """The `run_loop` step: forward/backward of the distillation loss over one step's micro-batches.

    ``teacher`` None means every batch carries cached top-k rows (``topk_idx``, ``topk_logp``).
    Per token: the divergence (times temperature^2 with ``loss.tau_squared``), plus
    ``loss.nll_weight`` x the student's NLL of the data's token.
    Metrics: loss, distill/<kind> (token mean), nll_token_mean (student NLL of the targets), tokens
    (and completion_tokens on on-policy batches).
    """
    kw = {"kind": loss.kind, "beta": loss.beta, "temperature": loss.temperature}

    def step(model, micro, loop: LoopConfig, device, scaler=None) -> dict[str, float]:
        scale = world()
        micro = [shard_rows(b, rank(), scale)[0] for b in micro] if scale > 1 else micro
        num_tokens, num_seqs = step_totals(micro)
        total, div_sum, nll_sum, sampled = 0.0, 0.0, 0.0, 0.0
        for i, b in enumerate(micro):
            b = {k: v.to(device) for k, v in b.items()}
            _, targets, seq = loss_targets(b)
            w = token_weights(seq, loop.loss_agg, num_tokens=num_tokens, num_seqs=num_seqs)
            with grad_sync(model, i == len(micro) - 1):
                with autocast(loop.precision, device):
                    s_logits = call(model, labelled_logits, b, vocab)
                    if teacher is None:
                        div = topk_token_divergence(s_logits, b["topk_idx"], b["topk_logp"], **kw)
                    else:
                        with torch.no_grad():
                            t_logits = labelled_logits(teacher, b, vocab)
                        div = token_divergence(s_logits, t_logits, **kw)
                    if loss.tau_squared:  # Hinton's T^2: the soft-target gradient keeps its T=1 scale
                        div = div * loss.temperature**2
                    # the student's NLL of the data's tokens: a loss term (nll_weight) and a metric either way
                    nll = F.cross_entropy(s_logits.float() if loss.nll_weight else s_logits.detach().float(),
                                          targets, reduction="none")  # fmt: skip
                    per = div + loss.nll_weight * nll if loss.nll_weight else div
                value = (per * w).sum()
                out = value * scale if scale > 1 else value
                (scaler.scale(out) if scaler is not None else out).backward()
            total += float(value.detach())
            div_sum += float(div.detach().sum())
            nll_sum += float(nll.detach().sum())
            sampled += float(b.get("completion_tokens", 0.0))
        total, div_sum, nll_sum, sampled = all_reduce_sum([total, div_sum, nll_sum, sampled])
        metrics = {
            "loss": total,
            f"distill/{loss.kind}": div_sum / num_tokens,
            "nll_token_mean": nll_sum / num_tokens,
            "tokens": num_tokens,
        }
        if sampled:  # on-policy batches: tokens the student sampled this step
            metrics["completion_tokens"] = sampled
        return metrics

    step.distributed = True  # type: ignore[attr-defined]
    return step
