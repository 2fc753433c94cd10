"""Policy losses: hand values, a per-token loop reference, and ratio == 1 on the first mini-batch."""

from __future__ import annotations

import pytest
import torch

from posttrain.algos.aggregate import aggregate_loss
from posttrain.algos.policy_losses import (
    POLICY_LOSSES,
    entropy_bonus,
    get_policy_loss,
    ppo_clip_loss,
    vanilla_pg_loss,
)


def loop_ppo(logp, old, adv, mask, clip_low, clip_high, dual_clip):
    """Token-mean PPO loss, one token at a time."""
    total, count = 0.0, 0
    for lp_row, old_row, a_row, m_row in zip(
        logp.tolist(), old.tolist(), adv.tolist(), mask.tolist(), strict=True
    ):
        for lp, o, a, m in zip(lp_row, old_row, a_row, m_row, strict=True):
            if not m:
                continue
            ratio = torch.tensor(lp - o, dtype=torch.float64).exp().item()
            clipped = min(max(ratio, 1 - clip_low), 1 + clip_high)
            loss = max(-a * ratio, -a * clipped)
            if dual_clip is not None and a < 0:
                loss = min(loss, -a * dual_clip)
            total, count = total + loss, count + 1
    return total / count


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize(
    "clip_low,clip_high,dual_clip", [(0.2, 0.2, None), (0.2, 0.28, None), (0.1, 0.3, 2.0)]
)
def test_ppo_matches_loop(seed, clip_low, clip_high, dual_clip):
    g = torch.Generator().manual_seed(seed)
    old = torch.randn(4, 6, generator=g, dtype=torch.float64)
    logp = old + 1.5 * torch.randn(
        4, 6, generator=g, dtype=torch.float64
    )  # ratios far outside the clip range
    adv = torch.randn(4, 6, generator=g, dtype=torch.float64)
    mask = (torch.rand(4, 6, generator=g) > 0.3).long()
    loss, metrics = ppo_clip_loss(
        logp, old, adv, mask, clip_low=clip_low, clip_high=clip_high, dual_clip=dual_clip
    )
    assert loss.item() == pytest.approx(
        loop_ppo(logp, old, adv, mask, clip_low, clip_high, dual_clip), abs=1e-10
    )
    assert 0 < metrics["pg/clip_frac"] < 1
    if dual_clip is not None:
        assert metrics["pg/dual_clip_frac"] > 0


def test_ratio_is_exactly_one_on_first_minibatch():
    """Same weights: the policy's log-probs are the old ones -> ratio 1, nothing clipped, loss = -mean(A)."""
    logp = torch.randn(3, 5, requires_grad=True)
    old = logp.detach().clone()
    adv = torch.randn(3, 5)
    mask = torch.ones(3, 5)
    loss, metrics = ppo_clip_loss(logp, old, adv, mask, clip_low=0.2, clip_high=0.28, dual_clip=3.0)
    assert metrics["pg/ratio_mean"] == 1.0 and metrics["pg/ratio_max"] == 1.0
    assert metrics["pg/clip_frac"] == 0 and metrics["pg/dual_clip_frac"] == 0 and metrics["pg/approx_kl"] == 0
    assert loss.item() == pytest.approx(-adv.mean().item(), abs=1e-6)
    loss.backward()  # on-policy gradient is the REINFORCE gradient -A / N per token
    assert torch.allclose(logp.grad, -adv / adv.numel(), atol=1e-7)


def test_asymmetric_clip_hand_values():
    old = torch.zeros(1, 4)
    logp = torch.log(torch.tensor([[1.5, 1.5, 0.5, 0.5]]))
    adv = torch.tensor([[1.0, -1.0, 1.0, -1.0]])
    mask = torch.ones(1, 4)
    loss, metrics = ppo_clip_loss(logp, old, adv, mask, clip_low=0.1, clip_high=0.3)
    # token losses: A>0, r=1.5 -> -1.3 (clipped high); A<0, r=1.5 -> 1.5; A>0, r=.5 -> -.5; A<0, r=.5 -> .9 (clipped low)
    assert loss.item() == pytest.approx((-1.3 + 1.5 - 0.5 + 0.9) / 4, abs=1e-6)
    assert metrics["pg/clip_frac"] == pytest.approx(0.5)


def test_dual_clip_bounds_negative_advantage_tokens():
    old = torch.zeros(1, 2)
    logp = torch.log(torch.tensor([[10.0, 10.0]])).requires_grad_()
    adv = torch.tensor([[-1.0, 1.0]])
    loss, metrics = ppo_clip_loss(logp, old, adv, torch.ones(1, 2), dual_clip=3.0)
    # A<0, r=10: min(max(10, 1.2), 3) = 3; A>0, r=10: -1.2 (clipped)
    assert loss.item() == pytest.approx((3.0 - 1.2) / 2, abs=1e-5)
    assert metrics["pg/dual_clip_frac"] == 0.5
    loss.backward()
    assert torch.equal(logp.grad, torch.zeros(1, 2))  # both tokens clipped: no gradient


def test_aggregation_modes_pass_through():
    logp = torch.zeros(2, 3)
    adv = torch.tensor([[1.0, 1.0, 1.0], [2.0, 0.0, 0.0]])
    mask = torch.tensor([[1, 1, 1], [1, 0, 0]])
    for agg, norm in [("token-mean", 1.0), ("seq-mean-token-mean", 1.0), ("seq-mean-token-sum", 3.0)]:
        loss, _ = ppo_clip_loss(logp, logp, adv, mask, agg=agg, norm=norm)
        assert loss == aggregate_loss(-adv, mask, agg, norm=norm)
    assert ppo_clip_loss(logp, logp, adv, mask)[0].item() == pytest.approx(-5 / 4)
    assert ppo_clip_loss(logp, logp, adv, mask, agg="seq-mean-token-mean")[0].item() == pytest.approx(-1.5)


def test_vanilla_and_entropy_bonus():
    logp = torch.log(torch.tensor([[2.0, 0.5]]))
    adv = torch.tensor([[1.0, 1.0]])
    loss, _ = vanilla_pg_loss(logp, torch.zeros(1, 2), adv, torch.ones(1, 2))
    assert loss.item() == pytest.approx(-1.25)  # no clipping: -(2 + .5) / 2
    ent = torch.tensor([[1.0, 3.0, 100.0]])
    bonus, metrics = entropy_bonus(ent, torch.tensor([[1, 1, 0]]), coef=0.1)
    assert bonus.item() == pytest.approx(-0.2) and metrics["pg/entropy"].item() == pytest.approx(2.0)


def test_registry():
    assert {"ppo_clip", "vanilla"} <= set(POLICY_LOSSES)
    assert get_policy_loss("ppo_clip") is ppo_clip_loss
    with pytest.raises(ValueError, match="valid: .*ppo_clip"):
        get_policy_loss("ppo")
