"""Reward-model losses and metrics against hand-computed numbers."""

from __future__ import annotations

import math

import pytest
import torch

from posttrain.algos.rm_losses import (
    bradley_terry_loss,
    kendall_tau,
    pairwise_accuracy,
    plackett_luce_loss,
    prm_bce_loss,
    ranking_pairs,
    step_auc,
    step_metrics,
)


def _softplus(x: float) -> float:
    return math.log1p(math.exp(x))


def test_bradley_terry_value_accuracy_and_margin():
    loss, m = bradley_terry_loss(torch.tensor([2.0, 0.0]), torch.tensor([1.0, 1.0]))
    # -log sigmoid(d) = softplus(-d); d = [1, -1]
    assert loss.item() == pytest.approx((_softplus(-1) + _softplus(1)) / 2, abs=1e-6)
    assert loss.item() == pytest.approx(0.813262, abs=1e-5)
    assert m["accuracy"].item() == 0.5 and m["margin"].item() == 0.0
    with_margin, _ = bradley_terry_loss(torch.tensor([2.0, 0.0]), torch.tensor([1.0, 1.0]), 0.5)
    assert with_margin.item() == pytest.approx((_softplus(-0.5) + _softplus(1.5)) / 2, abs=1e-6)
    per_pair, _ = bradley_terry_loss(
        torch.tensor([2.0, 0.0]), torch.tensor([1.0, 1.0]), torch.tensor([0.5, 0.0])
    )
    assert per_pair.item() == pytest.approx((_softplus(-0.5) + _softplus(1.0)) / 2, abs=1e-6)


def test_plackett_luce_three_items_by_hand():
    loss, _ = plackett_luce_loss(torch.tensor([[3.0, 1.0, 2.0]]))
    e = math.exp
    want = -(3 - math.log(e(3) + e(1) + e(2))) - (1 - math.log(e(1) + e(2)))
    assert loss.item() == pytest.approx(want, abs=1e-5)
    assert loss.item() == pytest.approx(1.720861, abs=1e-5)


def test_plackett_luce_of_two_items_equals_bradley_terry():
    torch.manual_seed(0)
    r = torch.randn(64, 2) * 3
    pl, _ = plackett_luce_loss(r)
    bt, _ = bradley_terry_loss(r[:, 0], r[:, 1])
    torch.testing.assert_close(pl, bt, atol=1e-6, rtol=1e-6)


def test_plackett_luce_ignores_padded_items_and_keeps_grads_finite():
    r = torch.tensor([[3.0, 1.0, 2.0, 99.0], [0.5, -0.5, 0.0, 0.0]], requires_grad=True)
    mask = torch.tensor([[True, True, True, False], [True, True, False, False]])
    loss, _ = plackett_luce_loss(r, mask)
    three, _ = plackett_luce_loss(torch.tensor([[3.0, 1.0, 2.0]]))
    two, _ = bradley_terry_loss(torch.tensor([0.5]), torch.tensor([-0.5]))
    assert loss.item() == pytest.approx((three.item() + two.item()) / 2, abs=1e-5)
    loss.backward()
    assert torch.isfinite(r.grad).all() and r.grad[0, 3] == 0 and r.grad[1, 2:].abs().sum() == 0


def test_ranking_pairs_accuracy_and_kendall_tau():
    r = torch.tensor([[3.0, 1.0, 2.0], [1.0, 2.0, 0.0]])
    mask = torch.tensor([[True, True, True], [True, True, False]])
    better, worse = ranking_pairs(r, mask)
    assert better.tolist() == [3.0, 3.0, 1.0, 1.0] and worse.tolist() == [1.0, 2.0, 2.0, 2.0]
    assert pairwise_accuracy(r, mask).item() == pytest.approx(2 / 4)
    # row 0: (3>1 +1) (3>2 +1) (1<2 -1) -> 1/3; row 1: one discordant pair -> -1
    assert kendall_tau(r, mask).item() == pytest.approx((1 / 3 - 1) / 2)


def test_prm_bce_with_soft_labels_and_weights():
    loss, m = prm_bce_loss(torch.tensor([0.0, 2.0]), torch.tensor([1.0, 0.25]), torch.tensor([0.5, 0.5]))
    s = 1 / (1 + math.exp(-2))
    want = 0.5 * math.log(2) + 0.5 * (-0.25 * math.log(s) - 0.75 * math.log(1 - s))
    assert loss.item() == pytest.approx(want, abs=1e-6)
    assert loss.item() == pytest.approx(1.160038, abs=1e-5)
    assert m["steps"].item() == 2


def test_step_metrics_accuracy_f1_and_first_error():
    # chain 0: labels 1 1 0, predicted 1 0 0 (first error at 1, truly at 2); chain 1: all right
    probs = torch.tensor([0.9, 0.4, 0.2, 0.8, 0.7])
    labels = torch.tensor([1.0, 1.0, 0.0, 1.0, 1.0])
    seq = torch.tensor([0, 0, 0, 5, 5])
    m = step_metrics(probs, labels, seq)
    assert m["step_acc"].item() == pytest.approx(4 / 5)
    assert m["step_f1"].item() == pytest.approx(
        2 * 1 / (2 + 1)
    )  # wrong-step class: tp 1, 2 predicted, 1 true
    assert m["first_error_acc"].item() == pytest.approx(1 / 2)
    # AUC: correct steps p = .9 .4 .8 .7 vs wrong .2 -> every correct step is above it
    assert m["step_auc"].item() == 1.0
    assert step_auc(torch.tensor([0.3, 0.6, 0.5, 0.1]), torch.tensor([1.0, 0.0, 1.0, 0.0])).item() == 0.5
    perfect = step_metrics(labels, labels, seq)
    assert perfect["first_error_acc"].item() == 1.0 and perfect["step_f1"].item() == 1.0
