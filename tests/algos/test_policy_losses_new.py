"""GSPO, CISPO, GMPO, SAPO, DPPO, KL-Cov: hand values, per-token loop references, on-policy gradients."""

from __future__ import annotations

import math

import pytest
import torch

from posttrain.algos.policy_losses import (
    POLICY_LOSSES,
    SEQUENCE_LOSSES,
    cispo_loss,
    dppo_loss,
    gmpo_loss,
    gspo_loss,
    kl_cov_loss,
    sapo_loss,
    vanilla_pg_loss,
)


def batch(seed: int, spread: float = 0.5):
    g = torch.Generator().manual_seed(seed)
    old = -torch.rand(4, 6, generator=g, dtype=torch.float64) * 3
    logp = (old + spread * torch.randn(4, 6, generator=g, dtype=torch.float64)).clamp(max=-1e-3)
    adv = torch.randn(4, 1, generator=g, dtype=torch.float64).expand(4, 6).clone()
    mask = (torch.rand(4, 6, generator=g) > 0.3).double()
    mask[:, 0] = 1
    return logp, old, adv, mask


def rows(*tensors):
    """Per row: the masked tokens' values of each tensor, as python lists."""
    logp, old, adv, mask = tensors
    for r in range(logp.shape[0]):
        keep = [t for t in range(logp.shape[1]) if mask[r, t]]
        yield (
            [logp[r, t].item() for t in keep],
            [old[r, t].item() for t in keep],
            [adv[r, t].item() for t in keep],
        )


def seq_mean(values):
    return sum(values) / len(values)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_gspo_matches_loop(seed):
    logp, old, adv, mask = batch(seed, spread=0.01)
    lo, hi = 3e-4, 4e-4
    per_seq, clipped_seqs = [], 0
    for lp, o, a in rows(logp, old, adv, mask):
        s = math.exp(seq_mean([x - y for x, y in zip(lp, o, strict=True)]))
        sc = min(max(s, 1 - lo), 1 + hi)
        per_seq.append(max(-a[0] * s, -a[0] * sc))
        clipped_seqs += -a[0] * sc > -a[0] * s
    loss, metrics = gspo_loss(logp, old, adv, mask, clip_low=lo, clip_high=hi, agg="seq-mean-token-mean")
    assert loss.item() == pytest.approx(seq_mean(per_seq), abs=1e-12)
    assert 0 < clipped_seqs < 4  # the case exercises both branches
    assert metrics["pg/seq_ratio_max"] >= metrics["pg/seq_ratio_mean"]


def test_gspo_hand_value_and_gradient():
    """One row, log-ratios (0.1, -0.3): s = exp(-0.1); A = 2, wide clip: loss = -2 exp(-0.1),
    d loss / d logp_t = -2 exp(-0.1) / 2 on each token."""
    old = torch.tensor([[-1.0, -2.0]], dtype=torch.float64)
    logp = (old + torch.tensor([[0.1, -0.3]], dtype=torch.float64)).requires_grad_()
    loss, _ = gspo_loss(
        logp, old, torch.full((1, 2), 2.0, dtype=torch.float64), torch.ones(1, 2), clip_low=0.5, clip_high=0.5
    )
    assert loss.item() == pytest.approx(-2 * math.exp(-0.1), abs=1e-12)
    loss.backward()
    assert logp.grad.tolist()[0] == pytest.approx([-math.exp(-0.1)] * 2, abs=1e-12)


@pytest.mark.parametrize("seed", [0, 1])
def test_cispo_matches_loop_and_keeps_clipped_gradient(seed):
    logp, old, adv, mask = batch(seed, spread=0.6)
    lo, hi = 0.2, 0.28
    total, n = 0.0, 0
    for lp, o, a in rows(logp, old, adv, mask):
        for x, y, aa in zip(lp, o, a, strict=True):
            w = min(max(math.exp(x - y), 1 - lo), 1 + hi)
            total, n = total - w * aa * x, n + 1
    logp = logp.clone().requires_grad_()
    loss, metrics = cispo_loss(logp, old, adv, mask, clip_low=lo, clip_high=hi, agg="token-mean")
    assert loss.item() == pytest.approx(total / n, abs=1e-12)
    assert metrics["pg/clip_frac"] > 0
    loss.backward()
    # every masked token has a gradient -w A / N, clipped ones too (PPO would give 0 to some)
    w = torch.exp(logp.detach() - old).clamp(1 - lo, 1 + hi)
    assert torch.allclose(logp.grad, -w * adv * mask / mask.sum(), atol=1e-12)


def test_cispo_on_policy_gradient_is_reinforce():
    """rho = 1: CISPO's gradient equals the vanilla policy gradient's."""
    logp, _, adv, mask = batch(3)
    grads = []
    for fn in (cispo_loss, vanilla_pg_loss):
        x = logp.clone().requires_grad_()
        fn(x, logp, adv, mask, agg="token-mean")[0].backward()
        grads.append(x.grad)
    assert torch.allclose(grads[0], grads[1], atol=1e-12)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_gmpo_matches_loop(seed):
    logp, old, adv, mask = batch(seed, spread=0.6)
    lo, hi = 0.4, 0.4
    per_seq = []
    for lp, o, a in rows(logp, old, adv, mask):
        a_i = seq_mean(a)
        # product form of the paper: sign(A) prod_t min(rho |A|, clip(rho) |A|)^(1/|y|)
        prod = 1.0
        for x, y in zip(lp, o, strict=True):
            rho = math.exp(x - y)
            rc = min(max(rho, math.exp(-lo)), math.exp(hi))
            term = min(rho * a_i, rc * a_i)  # the clipped objective of the token
            prod *= abs(term) ** (1 / len(lp))
        per_seq.append(-math.copysign(prod, a_i))
    loss, _ = gmpo_loss(logp, old, adv, mask, clip_low=lo, clip_high=hi, agg="seq-mean-token-mean")
    assert loss.item() == pytest.approx(seq_mean(per_seq), rel=1e-10)


def test_gmpo_hand_value():
    """A = 1, log-ratios (0.2, 0.6) with clip 0.4: min keeps 0.2 and clips 0.6 -> 0.4; loss = -exp(0.3)."""
    old = torch.zeros(1, 2, dtype=torch.float64) - 1
    logp = old + torch.tensor([[0.2, 0.6]], dtype=torch.float64)
    loss, m = gmpo_loss(logp, old, torch.ones(1, 2, dtype=torch.float64), torch.ones(1, 2))
    assert loss.item() == pytest.approx(-math.exp(0.3), abs=1e-12)
    assert m["pg/clip_frac"].item() == pytest.approx(0.5)


@pytest.mark.parametrize("seed", [0, 1])
def test_sapo_matches_loop(seed):
    logp, old, adv, mask = batch(seed, spread=0.6)
    per_seq = []
    for lp, o, a in rows(logp, old, adv, mask):
        terms = []
        for x, y, aa in zip(lp, o, a, strict=True):
            tau = 1.0 if aa > 0 else 1.05
            terms.append(-(4 / tau) / (1 + math.exp(-tau * (math.exp(x - y) - 1))) * aa)
        per_seq.append(seq_mean(terms))
    loss, _ = sapo_loss(logp, old, adv, mask, tau_pos=1.0, tau_neg=1.05, agg="seq-mean-token-mean")
    assert loss.item() == pytest.approx(seq_mean(per_seq), abs=1e-12)


def test_sapo_hand_value_and_unit_slope_on_policy():
    """rho = 1: f = 2/tau (loss -2A/tau) and df/drho = 1, so the gradient is REINFORCE's."""
    logp = torch.tensor([[-0.5, -1.5]], dtype=torch.float64, requires_grad=True)
    adv = torch.tensor([[1.0, -1.0]], dtype=torch.float64)
    loss, _ = sapo_loss(
        logp, logp.detach(), adv, torch.ones(1, 2), tau_pos=1.0, tau_neg=2.0, agg="token-mean"
    )
    assert loss.item() == pytest.approx((-2.0 + 1.0) / 2, abs=1e-12)
    loss.backward()
    assert logp.grad.tolist()[0] == pytest.approx([-0.5, 0.5], abs=1e-12)


@pytest.mark.parametrize("divergence", ["tv", "kl"])
def test_dppo_matches_loop(divergence):
    logp, old, adv, mask = batch(4, spread=0.8)
    delta = 0.05
    total, n, dropped = 0.0, 0, 0
    for lp, o, a in rows(logp, old, adv, mask):
        for x, y, aa in zip(lp, o, a, strict=True):
            p, q, rho = math.exp(x), math.exp(y), math.exp(x - y)
            d = (
                abs(p - q)
                if divergence == "tv"
                else q * math.log(q / p) + (1 - q) * math.log((1 - q) / (1 - p))
            )
            away = (aa > 0 and rho > 1) or (aa < 0 and rho < 1)
            keep = not (away and d > delta)
            dropped += not keep
            total, n = total - keep * rho * aa, n + 1
    loss, m = dppo_loss(logp, old, adv, mask, delta=delta, divergence=divergence, agg="token-mean")
    assert loss.item() == pytest.approx(total / n, abs=1e-10)
    assert dropped > 0 and m["pg/clip_frac"].item() == pytest.approx(dropped / n)


def test_dppo_lets_a_rare_token_move_far():
    """q = 0.01 -> p = 0.03 (ratio 3, TV 0.02 < delta): kept, where PPO's ratio clip would stop it."""
    old, logp = torch.log(torch.tensor([[0.01]])), torch.log(torch.tensor([[0.03]]))
    loss, m = dppo_loss(logp, old, torch.ones(1, 1), torch.ones(1, 1), delta=0.15)
    assert m["pg/clip_frac"].item() == 0 and loss.item() == pytest.approx(-3.0, rel=1e-5)


def test_kl_cov_penalises_only_top_covariance_tokens():
    logp, old, adv, mask = batch(5, spread=0.4)
    n = int(mask.sum())
    k = math.ceil(0.1 * n)
    m = mask.bool()
    cov = (logp - logp[m].mean()) * (adv - adv[m].mean())
    ranked = sorted(((cov[r, t].item(), r, t) for r in range(4) for t in range(6) if m[r, t]), reverse=True)
    picked = {(r, t) for _, r, t in ranked[:k]}
    total = 0.0
    for r in range(4):
        for t in range(6):
            if m[r, t]:
                lr = (logp[r, t] - old[r, t]).item()
                total += -math.exp(lr) * adv[r, t].item() + ((r, t) in picked) * 0.5 * abs(lr)
    loss, metrics = kl_cov_loss(logp, old, adv, mask, cov_frac=0.1, cov_coef=0.5, agg="token-mean")
    assert loss.item() == pytest.approx(total / n, abs=1e-12)
    assert metrics["pg/cov_selected_frac"].item() == pytest.approx(k / n)


def test_registry_and_sequence_flags():
    for name in ("gspo", "cispo", "gmpo", "sapo", "dppo", "kl_cov"):
        assert name in POLICY_LOSSES
    assert {"gspo", "gmpo"} == SEQUENCE_LOSSES


@pytest.mark.parametrize("name", ["gspo", "cispo", "gmpo", "sapo", "dppo", "kl_cov"])
def test_zero_advantage_gives_zero_gradient(name):
    """No signal, no update: every loss is homogeneous in A (kl_cov's penalty is 0 at rho = 1)."""
    logp, _, _, mask = batch(6)
    x = logp.clone().requires_grad_()
    loss, _ = POLICY_LOSSES[name](x, logp, torch.zeros_like(logp), mask)
    loss.backward()
    assert loss.item() == 0 and torch.count_nonzero(x.grad) == 0
