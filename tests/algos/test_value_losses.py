"""Clipped value loss: hand values and a per-token loop reference."""

from __future__ import annotations

import pytest
import torch

from posttrain.algos.value_losses import clipped_value_loss


def loop_value_loss(values, old, returns, mask, clip):
    total, count = 0.0, 0
    for v_row, o_row, r_row, m_row in zip(
        values.tolist(), old.tolist(), returns.tolist(), mask.tolist(), strict=True
    ):
        for v, o, r, m in zip(v_row, o_row, r_row, m_row, strict=True):
            if not m:
                continue
            err = (v - r) ** 2
            if clip is not None:
                v_clip = o + min(max(v - o, -clip), clip)
                err = max(err, (v_clip - r) ** 2)
            total, count = total + 0.5 * err, count + 1
    return total / count


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("clip", [None, 0.2, 1.0])
def test_matches_loop(seed, clip):
    g = torch.Generator().manual_seed(seed)
    old = torch.randn(4, 5, generator=g, dtype=torch.float64)
    values = old + torch.randn(4, 5, generator=g, dtype=torch.float64)
    returns = torch.randn(4, 5, generator=g, dtype=torch.float64)
    mask = (torch.rand(4, 5, generator=g) > 0.3).long()
    loss, _ = clipped_value_loss(values, old, returns, mask, clip_range=clip)
    assert loss.item() == pytest.approx(loop_value_loss(values, old, returns, mask, clip), abs=1e-10)


def test_hand_values_and_gradient():
    old = torch.tensor([[0.0, 0.0]])
    values = torch.tensor([[1.0, 0.1]], requires_grad=True)
    returns = torch.tensor([[2.0, 0.0]])
    loss, metrics = clipped_value_loss(values, old, returns, torch.ones(1, 2), clip_range=0.2)
    # token 1: unclipped (1-2)^2 = 1, clipped (0.2-2)^2 = 3.24 -> 3.24 (no gradient through the clipped value)
    # token 2: (0.1)^2 = .01 both ways
    assert loss.item() == pytest.approx(0.5 * (3.24 + 0.01) / 2)
    assert metrics["vf/clip_frac"].item() == pytest.approx(0.5)
    loss.backward()
    assert values.grad[0, 0].item() == 0.0
    assert values.grad[0, 1].item() == pytest.approx(0.5 * 2 * 0.1 / 2)


def test_perfect_critic_explains_all_variance():
    returns = torch.tensor([[1.0, 2.0, 3.0]])
    loss, metrics = clipped_value_loss(returns.clone(), returns.clone(), returns, torch.ones(1, 3))
    assert loss.item() == 0.0
    assert metrics["vf/explained_var"].item() == pytest.approx(1.0)
