"""Parity with TRL where it implements the same loss: the same log-prob, advantage and mask tensors
go to our function and to TRL's trainer loss code; values and gradients agree within 1e-6.

TRL's loss math lives inside trainer methods (`GRPOTrainer._compute_loss`, `DPOTrainer._compute_loss`),
so each is called unbound on the minimal trainer state it reads, with the model forward replaced by
the given log-probs. Runs only with the `[bench]` extra (trl) installed; nothing of TRL is copied.
"""

from __future__ import annotations

from collections import defaultdict
from types import SimpleNamespace

import pytest
import torch

pytestmark = pytest.mark.slow  # importing trl (transformers' trainer stack) alone takes 10-30 s here
trl = pytest.importorskip(
    "trl", reason="TRL parity tests need the [bench] extra: pip install 'posttrain[bench]'"
)

from posttrain.algos.policy_losses import cispo_loss, gspo_loss, ppo_clip_loss, sapo_loss  # noqa: E402
from posttrain.algos.preference_losses import get_preference_loss  # noqa: E402

B, T = 6, 7
TOL = 1e-6


class Accelerator:
    """Single process: every collective is the identity."""

    num_processes, sync_gradients, device = 1, True, torch.device("cpu")

    def reduce(self, x, reduction="sum"):
        return x

    def gather(self, x):
        return x

    gather_for_metrics = gather


def tensors(seed: int):
    g = torch.Generator().manual_seed(seed)
    old = -torch.rand(B, T, generator=g, dtype=torch.float64) * 3
    logp = (old + 0.3 * torch.randn(B, T, generator=g, dtype=torch.float64)).clamp(max=-1e-3)
    adv = torch.randn(B, generator=g, dtype=torch.float64)
    mask = torch.ones(B, T, dtype=torch.float64)
    for r in range(B):  # ragged completions: aggregation modes differ
        mask[r, 2 + r % (T - 2) :] = 0
    return logp, old, adv, mask


def trl_grpo(loss_type, logp, old, adv, mask, *, eps_low=0.2, eps_high=0.2, level="token", tau=(1.0, 1.05)):
    """GRPOTrainer._compute_loss on the given tensors; returns (loss, d loss / d logp)."""
    from trl.trainer.grpo_trainer import GRPOTrainer

    x = logp.clone().requires_grad_()
    args = SimpleNamespace(
        delta=None, sapo_temperature_pos=tau[0], sapo_temperature_neg=tau[1], use_bias_correction_kl=False,
        steps_per_generation=1,
    )  # fmt: skip
    trainer = SimpleNamespace(
        top_entropy_quantile=1.0, off_policy_mask_threshold=None, importance_sampling_level=level, beta=0.0,
        loss_type=loss_type, epsilon_low=eps_low, epsilon_high=eps_high, args=args, use_vllm=False,
        model=SimpleNamespace(training=True), current_gradient_accumulation_steps=1, accelerator=Accelerator(),
        _metrics=defaultdict(lambda: defaultdict(list)), _entropy_bonus_enabled=False, aux_loss_enabled=False,
        max_completion_length=T, use_adaptive_entropy=False,
        _get_per_token_logps_and_entropies=lambda *a, **k: (x, torch.zeros_like(x), None),
    )  # fmt: skip
    inputs = {
        "prompt_ids": torch.zeros(B, 1, dtype=torch.long), "prompt_mask": torch.ones(B, 1, dtype=torch.long),
        "completion_ids": torch.zeros(B, T, dtype=torch.long), "completion_mask": mask,
        "advantages": adv, "old_per_token_logps": old, "num_items_in_batch": mask.sum(),
    }  # fmt: skip
    loss = GRPOTrainer._compute_loss(trainer, None, inputs)
    loss.backward()
    return loss.detach(), x.grad


def ours(fn, logp, old, adv, mask, **kw):
    x = logp.clone().requires_grad_()
    loss, _ = fn(x, old, adv[:, None].expand(B, T), mask, **kw)
    loss.backward()
    return loss.detach(), x.grad


def agree(a, b):
    torch.testing.assert_close(a[0], b[0], rtol=0, atol=TOL)
    torch.testing.assert_close(a[1], b[1], rtol=0, atol=TOL)


@pytest.mark.parametrize("seed", [0, 1])
def test_dapo_is_ppo_clip_token_mean(seed):
    t = tensors(seed)
    agree(
        trl_grpo("dapo", *t, eps_low=0.2, eps_high=0.28),
        ours(ppo_clip_loss, *t, clip_low=0.2, clip_high=0.28, agg="token-mean"),
    )


@pytest.mark.parametrize("seed", [0, 1])
def test_dr_grpo_is_ppo_clip_seq_mean_token_sum(seed):
    t = tensors(seed)
    agree(trl_grpo("dr_grpo", *t), ours(ppo_clip_loss, *t, agg="seq-mean-token-sum", norm=float(T)))


@pytest.mark.parametrize("seed", [0, 1])
def test_grpo_is_ppo_clip_seq_mean_token_mean(seed):
    t = tensors(seed)
    agree(trl_grpo("grpo", *t), ours(ppo_clip_loss, *t, agg="seq-mean-token-mean"))


@pytest.mark.parametrize("seed", [0, 1])
def test_cispo(seed):
    """TRL caps the weight at epsilon_high itself (min(rho, eps_high), no lower bound); ours clips to
    [1 - clip_low, 1 + clip_high], so eps_high = 1 + clip_high and clip_low = 1 (a bound of 0)."""
    t = tensors(seed)
    agree(
        trl_grpo("cispo", *t, eps_high=1.1),
        ours(cispo_loss, *t, clip_low=1.0, clip_high=0.1, agg="token-mean"),
    )


@pytest.mark.parametrize("seed", [0, 1])
def test_sapo(seed):
    t = tensors(seed)
    agree(
        trl_grpo("sapo", *t, tau=(1.0, 1.7)),
        ours(sapo_loss, *t, tau_pos=1.0, tau_neg=1.7, agg="seq-mean-token-mean"),
    )


@pytest.mark.parametrize("seed", [0, 1])
def test_gspo_is_trl_sequence_level_importance_sampling(seed):
    t = tensors(seed)
    agree(
        trl_grpo("grpo", *t, eps_low=3e-2, eps_high=4e-2, level="sequence"),
        ours(gspo_loss, *t, clip_low=3e-2, clip_high=4e-2, agg="seq-mean-token-mean"),
    )


# ---------------------------------------------------------------- DPO family


def trl_dpo(loss_type, pi_tok, ref_w, ref_l, mask, *, beta, label_smoothing=0.0):
    """DPOTrainer._compute_loss with precomputed reference log-prob sums; pi_tok (2B, T) per-token
    log-probs, chosen rows first, already 0 off the completion (as TRL's fused head gives them)."""
    from trl.trainer.dpo_trainer import DPOTrainer

    x = pi_tok.clone().requires_grad_()
    n, width = x.shape
    out = SimpleNamespace(
        log_probs=x, entropy=torch.zeros(n, width), mean_logits=torch.zeros(n, width),
        is_top1=torch.zeros(n, width, dtype=torch.bool),
    )  # fmt: skip
    trainer = SimpleNamespace(
        model=SimpleNamespace(training=True), accelerator=Accelerator(), aux_loss_enabled=False, ld_alpha=None,
        precompute_ref_logps=True, f_divergence_type="reverse_kl", loss_types=[loss_type], loss_weights=[1.0],
        beta=beta, label_smoothing=label_smoothing, use_weighting=False, _metrics=defaultdict(lambda: defaultdict(list)),
        _total_train_tokens=0, _tp_size=1,
    )  # fmt: skip
    full_mask = torch.cat([torch.zeros(n, 1), mask], dim=1)  # a prompt token, then the completion
    inputs = {
        "input_ids": torch.zeros(n, width + 1, dtype=torch.long), "attention_mask": torch.ones(n, width + 1),
        "completion_mask": full_mask, "ref_chosen_logps": ref_w, "ref_rejected_logps": ref_l,
    }  # fmt: skip
    loss = DPOTrainer._compute_loss(trainer, lambda **kw: out, inputs, False)
    loss.backward()
    return loss.detach(), x.grad


@pytest.mark.parametrize("name", ["sigmoid", "ipo", "hinge", "robust"])
def test_dpo_family(name):
    g = torch.Generator().manual_seed(7)
    _, _, _, mask = tensors(0)
    mask = torch.cat([mask, mask.flip(0)])  # (2B, T): chosen rows, then rejected rows
    pi_tok = (-torch.rand(2 * B, T, generator=g, dtype=torch.float64)) * mask
    ref_sum = pi_tok.sum(-1) + 0.5 * torch.randn(2 * B, generator=g, dtype=torch.float64)
    kw = {"label_smoothing": 0.2} if name == "robust" else {}
    ref = trl_dpo(name, pi_tok, ref_sum[:B], ref_sum[B:], mask, beta=0.3, **kw)

    spec = get_preference_loss(name)
    x = pi_tok.clone().requires_grad_()
    lengths = mask.sum(-1)
    pi, r = x.sum(-1), ref_sum
    if spec.average:  # IPO takes per-token means (TRL divides both log-ratios by the length)
        pi, r = pi / lengths, r / lengths
    loss, _ = spec.fn(pi[:B], pi[B:], r[:B], r[B:], beta=0.3, **kw)
    loss.backward()
    agree(ref, (loss.detach(), x.grad))
