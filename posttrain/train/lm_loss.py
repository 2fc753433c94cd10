"""Causal-LM NLL on a batch, computing logits only where the loss looks.

The backbone runs once; hidden states are gathered at the positions whose
next-token label is trained, and the LM head + cross-entropy run fused and
chunked on those rows only (`posttrain.algos.cross_entropy`). Prompt and
padding positions never reach the (V,)-wide head. Models whose head does more
than a matmul (logit soft-capping, logit scaling) and prompt-learning PEFT
methods (which prepend virtual tokens) take the plain full-logits path.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from posttrain.algos.aggregate import AggMode, token_weights
from posttrain.algos.cross_entropy import fused_linear_cross_entropy

IGNORE = -100


def _unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The transformers causal-LM under PEFT wrappers (LoRA layers stay injected)."""
    get_base = getattr(model, "get_base_model", None)
    return get_base() if callable(get_base) else model


def supports_fused_head(model: torch.nn.Module) -> bool:
    peft_cfg = getattr(model, "peft_config", None)
    if peft_cfg and any(getattr(c, "is_prompt_learning", False) for c in peft_cfg.values()):
        return False
    cfg = _unwrap(model).config
    if getattr(cfg, "final_logit_softcapping", None):
        return False
    for key in ("logit_scale", "logits_scaling"):
        if getattr(cfg, key, 1.0) not in (None, 1, 1.0):
            return False
    # A LoRA-wrapped head is not a plain Linear: its weight alone is not the head.
    return isinstance(_unwrap(model).get_output_embeddings(), torch.nn.Linear)


def sequence_ids(labels: torch.Tensor, position_ids: torch.Tensor | None) -> torch.Tensor:
    """(B, T) id of the sample each position belongs to: rows for padded batches,
    restarts of position_ids (== 0) for packed rows. Ids are unique across the batch."""
    b, t = labels.shape
    if position_ids is None:
        return torch.arange(b, device=labels.device)[:, None].expand(b, t)
    starts = (position_ids == 0).long()
    starts[:, 0] = 1
    return starts.flatten().cumsum(0).view(b, t) - 1


def loss_targets(batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Shifted targets: returns (mask (B, T-1) bool, targets (N,), seq ids (N,))."""
    labels = batch["labels"]
    shifted = labels[:, 1:]
    mask = shifted != IGNORE
    seq = sequence_ids(labels, batch.get("position_ids"))[:, 1:]
    return mask, shifted[mask], seq[mask]


def causal_lm_loss(
    model: torch.nn.Module,
    batch: dict[str, torch.Tensor],
    agg: AggMode = "token-mean",
    *,
    num_tokens: float | None = None,
    num_seqs: float | None = None,
    chunk_size: int = 1024,
) -> tuple[torch.Tensor, dict[str, Any]]:
    """Masked next-token NLL of `batch` (input_ids, labels, attention_mask or position_ids; (B, T)).

    Aggregation follows `agg`; num_tokens / num_seqs are the totals over the
    whole accumulation step (so accumulated micro-batches give the full-batch
    gradient). Returns (loss, {"nll_sum", "tokens"}) with detached metrics.
    """
    mask, targets, seq = loss_targets(batch)
    weights = token_weights(seq, agg, num_tokens=num_tokens, num_seqs=num_seqs)
    inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "position_ids") if k in batch}
    if supports_fused_head(model):
        lm = _unwrap(model)
        hidden = lm.get_decoder()(**inputs, use_cache=False).last_hidden_state
        h = hidden[:, :-1][mask]
        loss, nll = fused_linear_cross_entropy(
            h, lm.get_output_embeddings().weight, targets, weights, chunk_size
        )
    else:
        logits = model(**inputs, use_cache=False).logits
        logits = logits[:, -batch["input_ids"].shape[1] :]  # prompt tuning prepends virtual tokens
        nll = F.cross_entropy(logits[:, :-1][mask].float(), targets, reduction="none")
        loss = (nll * weights).sum()
        nll = nll.detach()
    return loss, {"nll_sum": nll.sum(), "tokens": targets.numel()}


def selected_hidden(model: torch.nn.Module, batch: dict[str, torch.Tensor]):
    """Backbone hidden states at the positions whose next token is labelled.

    Returns (h (N, H), targets (N,), seq ids (N,), head weight (V, H)); requires
    `supports_fused_head(model)`.
    """
    mask, targets, seq = loss_targets(batch)
    inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "position_ids") if k in batch}
    lm = _unwrap(model)
    hidden = lm.get_decoder()(**inputs, use_cache=False).last_hidden_state
    return hidden[:, :-1][mask], targets, seq, lm.get_output_embeddings().weight


def token_logprobs(
    model: torch.nn.Module,
    batch: dict[str, torch.Tensor],
    *,
    temperature: float = 1.0,
    with_entropy: bool = False,
    chunk_size: int = 1024,
    entropy_grad: bool = True,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """log pi(y_t | y_<t) at every labelled position, differentiable.

    batch: input_ids, labels (-100 = not scored), attention_mask or position_ids; (B, T).
    Logits are divided by `temperature` (match the sampler's). Returns
    (logp (N,), entropy (N,) or None, seq ids (N,)) in the row-major order of
    the labelled positions; `seq` says which sample each value belongs to
    (rows when padded, packed samples when position_ids restart); `entropy_grad=False`
    gives the entropy without a graph (a metric).
    Only labelled positions go through the LM head, chunk by chunk.
    """
    if supports_fused_head(model):
        h, targets, seq, weight = selected_hidden(model, batch)
        logits_of = lambda s, e: (h[s:e] @ weight.t()).float()  # noqa: E731
    else:
        mask, targets, seq = loss_targets(batch)
        inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "position_ids") if k in batch}
        full = model(**inputs, use_cache=False).logits[:, -batch["input_ids"].shape[1] :]
        sel = full[:, :-1][mask]
        logits_of = lambda s, e: sel[s:e].float()  # noqa: E731
    logp, entropy = chunked_logprobs(logits_of, targets, temperature, with_entropy, chunk_size, entropy_grad)
    return logp, entropy, seq


def chunked_logprobs(
    logits_of,
    targets: torch.Tensor,
    temperature: float = 1.0,
    with_entropy: bool = False,
    chunk_size: int = 1024,
    entropy_grad: bool = True,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """log softmax(logits / T)[target] (N,) and optionally the entropy (N,), `chunk_size` rows at a time.

    logits_of(start, end) -> (end - start, V) logits of those rows; only one chunk of V-wide
    logits is alive at a time. ``entropy_grad=False`` computes the entropy without a graph (a
    metric only), saving one V-wide buffer per chunk in the backward.
    """
    logps, ents = [], []
    for s in range(0, targets.numel(), chunk_size):
        logits = logits_of(s, s + chunk_size)
        if temperature != 1.0:  # a V-wide division and its backward: ~9% of a SmolLM2 SFT step
            logits = logits / temperature
        logp_all = torch.log_softmax(logits, dim=-1)
        logps.append(logp_all.gather(1, targets[s : s + chunk_size, None]).squeeze(1))
        if with_entropy:
            with torch.set_grad_enabled(entropy_grad and torch.is_grad_enabled()):
                ents.append(-(logp_all.exp() * logp_all).sum(-1))
    empty = torch.zeros(0, device=targets.device)
    logp = torch.cat(logps) if logps else empty
    entropy = (torch.cat(ents) if ents else empty) if with_entropy else None
    return logp, entropy


def sequence_logprobs(
    model: torch.nn.Module, batch: dict[str, torch.Tensor], **kw
) -> tuple[torch.Tensor, torch.Tensor]:
    """Sum of token log-probs per sample and its token count: ((S,), (S,)), samples in order of first appearance."""
    logp, _, seq = token_logprobs(model, batch, **kw)
    _, inverse, counts = torch.unique_consecutive(seq, return_inverse=True, return_counts=True)
    sums = torch.zeros(counts.numel(), dtype=logp.dtype, device=logp.device).index_add(0, inverse, logp)
    return sums, counts
