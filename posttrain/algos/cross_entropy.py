"""Fused, chunked linear + cross-entropy: the LM head and the NLL in one pass.

For hidden states h (N, H) at the loss positions only, output embedding W (V, H)
and targets y (N,), computes

    loss = sum_i w_i * (logsumexp_v(h_i . W_v) - h_i . W_{y_i})

chunk by chunk over N. The gradients are formed in the forward pass
(d logits = w_i * (softmax - onehot)), so neither the (N, V) logits nor the
softmax are kept for backward: memory is O(chunk * V) instead of O(N * V), and
no logits are computed at positions the loss ignores (prompt, padding). This is
the trick behind Liger's fused linear cross-entropy, written here in plain torch.
Numerically: log-sum-exp with the max subtracted, accumulation in float32.
"""

from __future__ import annotations

import torch


class _FusedLinearCE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, targets, weights, chunk_size):
        n = hidden.shape[0]
        nll = torch.empty(n, dtype=torch.float32, device=hidden.device)
        grad_h = torch.empty_like(hidden) if ctx.needs_input_grad[0] else None
        grad_w = torch.zeros_like(weight, dtype=torch.float32) if ctx.needs_input_grad[1] else None
        for start in range(0, n, chunk_size):
            h = hidden[start : start + chunk_size]
            y = targets[start : start + chunk_size]
            logits = (h @ weight.t()).float()  # (c, V)
            lse = torch.logsumexp(logits, dim=-1)
            nll[start : start + chunk_size] = lse - logits.gather(1, y[:, None]).squeeze(1)
            if grad_h is None and grad_w is None:
                continue
            # d/dlogits of w * nll = w * (softmax - onehot)
            probs = torch.exp(logits.sub_(lse[:, None]))
            probs[torch.arange(y.numel(), device=y.device), y] -= 1.0
            probs.mul_(weights[start : start + chunk_size, None])
            probs = probs.to(hidden.dtype)
            if grad_h is not None:
                grad_h[start : start + chunk_size] = probs @ weight
            if grad_w is not None:
                grad_w.addmm_(probs.t().float(), h.float())
        ctx.save_for_backward(grad_h, grad_w)
        ctx.weight_dtype = weight.dtype
        return (nll * weights).sum(), nll

    @staticmethod
    def backward(ctx, grad_loss, grad_nll):
        grad_h, grad_w = ctx.saved_tensors
        # grad_nll (per-token values) is only used for metrics; it must not carry gradient.
        gh = grad_h * grad_loss if grad_h is not None else None
        gw = (grad_w * grad_loss).to(ctx.weight_dtype) if grad_w is not None else None
        return gh, gw, None, None, None


def fused_linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    weights: torch.Tensor,
    chunk_size: int = 1024,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Weighted NLL of `targets` under logits `hidden @ weight.T`, never storing logits.

    hidden: (N, H) hidden states at loss positions. weight: (V, H) output
    embedding. targets: (N,) token ids. weights: (N,) per-token loss weights
    (see `posttrain.algos.aggregate.token_weights`).
    Returns (loss scalar with gradient, nll (N,) detached per-token values).
    The per-token nll output is for metrics only: do not backpropagate through it.
    """
    loss, nll = _FusedLinearCE.apply(hidden, weight, targets, weights.to(torch.float32), chunk_size)
    return loss, nll.detach()


def reference_linear_cross_entropy(
    hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, weights: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Unfused reference (full logits, F.cross_entropy); same contract as the fused one."""
    logits = (hidden @ weight.t()).float()
    nll = torch.nn.functional.cross_entropy(logits, targets, reduction="none")
    return (nll * weights).sum(), nll.detach()
