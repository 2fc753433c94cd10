"""Within-question pairwise loss of a PRM: hand values and the loop it vectorises."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from posttrain.algos.rm_losses import grouped_pair_loss


def test_grouped_pair_loss_hand_values():
    logits = torch.tensor([1.0, 0.0, 2.0, 0.5, 9.0])
    labels = torch.tensor([1.0, 0.0, 0.0, 1.0, 0.0])
    groups = torch.tensor([0, 0, 1, 1, -1])  # the last step is in no group: never paired
    loss, m = grouped_pair_loss(logits, labels, groups)
    # group 0: right step 0 vs wrong step 1, diff +1; group 1: right step 3 vs wrong step 2, diff -1.5
    want = (-math.log(1 / (1 + math.exp(-1.0))) - math.log(1 / (1 + math.exp(1.5)))) / 2
    assert float(loss) == pytest.approx(want, rel=1e-6)  # (0.31326 + 1.70141) / 2
    assert float(m["pairs"]) == 2 and float(m["pair_acc"]) == 0.5


def test_soft_labels_weight_pairs_by_their_gap_and_ties_count_half():
    logits = torch.tensor([0.0, 0.0, 1.0])
    labels = torch.tensor([0.75, 0.25, 0.25])  # pairs (0,1) gap 0.5 diff 0; (0,2) gap 0.5 diff -1
    loss, m = grouped_pair_loss(logits, labels, torch.tensor([3, 3, 3]))
    want = 0.5 * (math.log(2) + math.log(1 + math.e)) / 1.0
    assert float(loss) == pytest.approx(want, rel=1e-6)
    assert float(m["pair_acc"]) == pytest.approx(0.25)  # a tie (half) and a miss, equal weights


def test_no_pair_gives_zero_loss_that_still_backpropagates():
    z = torch.tensor([0.3, -0.2], requires_grad=True)
    loss, m = grouped_pair_loss(z, torch.tensor([1.0, 0.0]), torch.tensor([0, 1]))  # different groups
    loss.backward()
    assert float(loss.detach()) == 0.0 and float(m["pairs"]) == 0 and torch.equal(z.grad, torch.zeros(2))


def test_matches_the_loop_over_pairs_and_its_gradient_ranks():
    g = torch.Generator().manual_seed(0)
    z = torch.randn(40, generator=g, requires_grad=True)
    y = torch.randint(0, 2, (40,), generator=g).float()
    groups = torch.randint(-1, 6, (40,), generator=g)
    loss, _ = grouped_pair_loss(z, y, groups)
    terms = [
        -F.logsigmoid(z[i] - z[j])
        for i in range(40)
        for j in range(40)
        if groups[i] == groups[j] >= 0 and y[i] > y[j]
    ]
    assert float(loss) == pytest.approx(float(torch.stack(terms).mean()), rel=1e-6)
    loss.backward()
    paired = torch.tensor(
        [(groups == groups[i]).logical_and(y != y[i]).any() and groups[i] >= 0 for i in range(40)]
    )
    assert (z.grad[paired & (y == 1)] < 0).all() and (z.grad[paired & (y == 0)] > 0).all()
    assert (z.grad[~paired] == 0).all()
