"""KL estimators, their placement (reward / loss) and the coefficient controller."""

from __future__ import annotations

import math

import pytest
import torch

from posttrain.algos.kl import KLController, adaptive_kl_coef, kl_estimate, kl_in_loss, kl_in_reward


def loop_kl(logp, ref, kind):
    out = []
    for lp_row, ref_row in zip(logp.tolist(), ref.tolist(), strict=True):
        row = []
        for lp, rf in zip(lp_row, ref_row, strict=True):
            log_r = rf - lp
            row.append({"k1": -log_r, "k2": 0.5 * log_r**2, "k3": math.exp(log_r) - 1 - log_r}[kind])
        out.append(row)
    return torch.tensor(out, dtype=torch.float64)


@pytest.mark.parametrize("kind", ["k1", "k2", "k3"])
def test_estimators_match_loop(kind):
    g = torch.Generator().manual_seed(0)
    logp = torch.randn(3, 5, generator=g, dtype=torch.float64)
    ref = logp + torch.randn(3, 5, generator=g, dtype=torch.float64)
    assert torch.allclose(kl_estimate(logp, ref, kind, k3_max=1e9), loop_kl(logp, ref, kind), atol=1e-12)


def test_hand_values():
    logp, ref = torch.tensor([math.log(0.5)]), torch.tensor([math.log(0.25)])  # log r = -log 2
    assert kl_estimate(logp, ref, "k1").item() == pytest.approx(math.log(2))
    assert kl_estimate(logp, ref, "k2").item() == pytest.approx(0.5 * math.log(2) ** 2)
    assert kl_estimate(logp, ref, "k3").item() == pytest.approx(0.5 - 1 + math.log(2))
    assert kl_estimate(torch.tensor([0.0]), torch.tensor([50.0]), "k3").item() == 10.0  # clamped, not inf
    with pytest.raises(ValueError, match="valid: k1, k2, k3"):
        kl_estimate(logp, ref, "k4")


def test_zero_when_policy_equals_reference():
    """First mini-batch, reference = initial policy: every estimator is exactly 0."""
    logp = torch.randn(4, 6, requires_grad=True)
    ref = logp.detach().clone()
    mask = torch.ones(4, 6)
    for kind in ("k1", "k2", "k3"):
        assert torch.equal(kl_estimate(logp, ref, kind), torch.zeros(4, 6))
        loss, metrics = kl_in_loss(logp, ref, mask, coef=0.1, kind=kind)
        assert loss.item() == 0.0 and metrics["kl/token_mean"] == 0.0
        rewards = torch.randn(4, 6)
        shaped, _ = kl_in_reward(rewards, logp, ref, mask, coef=0.1, kind=kind)
        assert torch.equal(shaped, rewards)


def test_k1_k3_unbiased_k3_lower_variance():
    """Tokens sampled from p: mean k1 and mean k3 estimate KL(p || q); k3 has the smaller variance."""
    p = torch.tensor([0.5, 0.3, 0.2])
    q = torch.tensor([0.4, 0.4, 0.2])
    true_kl = (p * (p / q).log()).sum().item()
    x = torch.multinomial(p, 200_000, replacement=True, generator=torch.Generator().manual_seed(0))
    logp, ref = p.log()[x][None], q.log()[x][None]
    k1, k3 = kl_estimate(logp, ref, "k1"), kl_estimate(logp, ref, "k3")
    assert k1.mean().item() == pytest.approx(true_kl, abs=2e-3)
    assert k3.mean().item() == pytest.approx(true_kl, abs=2e-3)
    assert k3.var() < k1.var()
    assert (k3 >= 0).all() and (kl_estimate(logp, ref, "k2") >= 0).all()


def test_kl_in_reward_is_per_token_and_masked():
    logp = torch.tensor([[0.0, -1.0, -2.0]])
    ref = torch.tensor([[-1.0, -1.0, 0.0]])
    rewards = torch.tensor([[0.0, 0.0, 1.0]])
    mask = torch.tensor([[1, 1, 0]])
    shaped, metrics = kl_in_reward(rewards, logp.requires_grad_(), ref, mask, coef=0.5, kind="k1")
    # k1 = logp - ref = [1, 0, -2]; the masked third token keeps its reward
    assert torch.allclose(shaped, torch.tensor([[-0.5, 0.0, 1.0]]))
    assert not shaped.requires_grad  # rewards are constants
    assert metrics["kl/token_mean"].item() == pytest.approx(0.5)
    assert metrics["kl/seq_sum"].item() == pytest.approx(1.0)


def test_kl_in_loss_gradient_and_aggregation():
    logp = torch.tensor([[-1.0, -2.0], [-0.5, -3.0]], requires_grad=True)
    ref = torch.tensor([[-1.5, -2.0], [-0.5, -1.0]])
    mask = torch.tensor([[1, 1], [1, 0]])
    loss, _ = kl_in_loss(logp, ref, mask, coef=2.0, kind="k3", agg="seq-mean-token-mean")
    k3 = loop_kl(logp.detach().double(), ref.double(), "k3")
    expected = 2.0 * ((k3[0, 0] + k3[0, 1]) / 2 + k3[1, 0]) / 2
    assert loss.item() == pytest.approx(expected.item(), abs=1e-6)
    loss.backward()
    # d k3 / d logp = 1 - r, r = exp(ref - logp); masked token gets no gradient
    r = math.exp(-0.5)
    assert logp.grad[0, 0].item() == pytest.approx(2.0 * (1 - r) / 2 / 2, abs=1e-6)
    assert logp.grad[1, 1].item() == 0.0


def test_adaptive_coefficient():
    # KL above target by more than 20%: error clipped to +0.2
    assert adaptive_kl_coef(0.1, 1.0, target=0.5, horizon=100, n_steps=10) == pytest.approx(0.1 * 1.02)
    assert adaptive_kl_coef(0.1, 0.45, target=0.5, horizon=100, n_steps=10) == pytest.approx(0.1 * (1 - 0.01))
    fixed = KLController(coef=0.05)
    assert fixed.update(100.0, 1000) == 0.05
    adaptive = KLController(coef=0.05, target=0.1, horizon=10)
    assert adaptive.update(1.0, 5) == pytest.approx(0.05 * 1.1)
    assert adaptive.update(0.0, 5) == pytest.approx(0.05 * 1.1 * 0.9)
