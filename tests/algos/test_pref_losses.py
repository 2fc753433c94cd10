"""Preference losses against hand-computed values, limiting cases and the registry contract."""

from __future__ import annotations

import math

import pytest
import torch

from posttrain.algos.preference_losses import (
    PREFERENCE_LOSSES,
    chosen_nll,
    conservative_dpo_loss,
    dpo_sigmoid_loss,
    get_preference_loss,
    hinge_loss,
    ipo_loss,
    kto_loss,
    log_odds,
    orpo_loss,
    register_preference_loss,
    robust_dpo_loss,
    simpo_loss,
)

T = torch.tensor
# Two pairs: h = (pi_w - ref_w) - (pi_l - ref_l) = (1 - 0) - (-1 - 0) = 2, and (0) - (2) = -2.
PI_W, PI_L, REF_W, REF_L = T([-4.0, -6.0]), T([-8.0, -3.0]), T([-5.0, -6.0]), T([-7.0, -5.0])


def _ls(x: float) -> float:
    """-log sigmoid(x)"""
    return math.log1p(math.exp(-x))


def test_dpo_hand_values_and_rewards():
    loss, m = dpo_sigmoid_loss(PI_W, PI_L, REF_W, REF_L, beta=0.5)
    assert loss.item() == pytest.approx((_ls(1.0) + _ls(-1.0)) / 2, rel=1e-6)
    assert torch.allclose(m["rewards/chosen"], T([0.5, 0.0]))
    assert torch.allclose(m["rewards/rejected"], T([-0.5, 1.0]))


def test_dpo_limits_are_log2():
    equal, _ = dpo_sigmoid_loss(PI_W, PI_W, REF_W, REF_W, beta=0.1)
    assert equal.item() == pytest.approx(math.log(2), abs=1e-7)
    tiny_beta, _ = dpo_sigmoid_loss(PI_W, PI_L, REF_W, REF_L, beta=1e-8)
    assert tiny_beta.item() == pytest.approx(math.log(2), abs=1e-6)


def test_dpo_gradient_raises_chosen_and_lowers_rejected():
    pi_w, pi_l = PI_W.clone().requires_grad_(), PI_L.clone().requires_grad_()
    dpo_sigmoid_loss(pi_w, pi_l, REF_W, REF_L, beta=0.5)[0].backward()
    assert (pi_w.grad < 0).all() and (pi_l.grad > 0).all()
    # d/dpi_w of -log sig(beta h) = -beta * sigmoid(-beta h) / B
    assert pi_w.grad[0].item() == pytest.approx(-0.5 * (1 / (1 + math.e)) / 2, rel=1e-5)


def test_conservative_dpo_hand_values_and_eps0_is_dpo():
    loss, _ = conservative_dpo_loss(PI_W, PI_L, REF_W, REF_L, beta=0.5, label_smoothing=0.2)
    want = sum(0.8 * _ls(z) + 0.2 * _ls(-z) for z in (1.0, -1.0)) / 2
    assert loss.item() == pytest.approx(want, rel=1e-6)
    zero, _ = conservative_dpo_loss(PI_W, PI_L, REF_W, REF_L, beta=0.5, label_smoothing=0.0)
    assert zero.item() == pytest.approx(dpo_sigmoid_loss(PI_W, PI_L, REF_W, REF_L, beta=0.5)[0].item())


def test_robust_dpo_hand_values_and_bounds():
    loss, _ = robust_dpo_loss(PI_W, PI_L, REF_W, REF_L, beta=0.5, label_smoothing=0.2)
    want = sum((0.8 * _ls(z) - 0.2 * _ls(-z)) / 0.6 for z in (1.0, -1.0)) / 2
    assert loss.item() == pytest.approx(want, rel=1e-6)
    zero, _ = robust_dpo_loss(PI_W, PI_L, REF_W, REF_L, beta=0.5, label_smoothing=0.0)
    assert zero.item() == pytest.approx(dpo_sigmoid_loss(PI_W, PI_L, REF_W, REF_L, beta=0.5)[0].item())
    with pytest.raises(ValueError, match="0.5"):
        robust_dpo_loss(PI_W, PI_L, REF_W, REF_L, label_smoothing=0.5)


def test_ipo_hand_values():
    loss, _ = ipo_loss(PI_W, PI_L, REF_W, REF_L, beta=0.25)  # target 1 / (2 tau) = 2
    assert loss.item() == pytest.approx(((2 - 2) ** 2 + (-2 - 2) ** 2) / 2)
    equal, _ = ipo_loss(PI_W, PI_W, REF_W, REF_W, beta=0.1)
    assert equal.item() == pytest.approx(25.0)  # (0 - 1 / 0.2)^2


def test_hinge_hand_values():
    loss, _ = hinge_loss(PI_W, PI_L, REF_W, REF_L, beta=0.25)  # beta h = 0.5, -0.5
    assert loss.item() == pytest.approx((0.5 + 1.5) / 2)
    big, _ = hinge_loss(PI_W, PI_L, REF_W, REF_L, beta=1.0)  # beta h = 2 -> 0, -2 -> 3
    assert big.item() == pytest.approx(1.5)


def test_simpo_hand_values_ignores_reference():
    w, lo = T([-0.5, -1.0]), T([-1.0, -0.5])  # per-token means
    loss, m = simpo_loss(w, lo, beta=2.0, target_margin=0.5)
    assert loss.item() == pytest.approx((_ls(1.0 - 0.5) + _ls(-1.0 - 0.5)) / 2, rel=1e-6)
    assert torch.allclose(m["rewards/chosen"], T([-1.0, -2.0]))
    assert simpo_loss(w, lo, T([9.0, 9.0]), T([-9.0, 1.0]), beta=2.0, target_margin=0.5)[0] == loss


def test_orpo_hand_values():
    w, lo = T([math.log(0.5)]), T([math.log(0.2)])  # P = 0.5 -> odds 1; P = 0.2 -> odds 0.25
    assert log_odds(w).item() == pytest.approx(0.0, abs=1e-6)
    assert log_odds(lo).item() == pytest.approx(math.log(0.25), rel=1e-5)
    loss, m = orpo_loss(w, lo, beta=0.1)
    want = -math.log(0.5) + 0.1 * _ls(math.log(4))
    assert loss.item() == pytest.approx(want, rel=1e-5)
    assert m["nll"].item() == pytest.approx(math.log(2), rel=1e-6)
    near_one, _ = orpo_loss(T([-1e-9]), T([-1.0]), beta=0.1)  # P -> 1 stays finite
    assert torch.isfinite(near_one)


def test_kto_hand_values_reference_point_and_detach():
    pi = T([-2.0, -3.0], requires_grad=True)
    ref = T([-3.0, -2.0])  # r = 1 (desirable), -1 (undesirable)
    kl_pi = T([-4.0, -5.0], requires_grad=True)
    kl_ref = T([-4.5, -5.5])  # z0 = mean(0.5, 0.5) = 0.5
    desirable = T([True, False])
    loss, m = kto_loss(
        pi, ref, kl_pi, kl_ref, desirable, beta=1.0, desirable_weight=2.0, undesirable_weight=1.0
    )
    sig = lambda x: 1 / (1 + math.exp(-x))  # noqa: E731
    want = (2.0 * (1 - sig(1 - 0.5)) + 1.0 * (1 - sig(0.5 + 1))) / 2
    assert loss.item() == pytest.approx(want, rel=1e-6)
    assert m["kl/reference_point"].item() == pytest.approx(0.5)
    assert m["rewards/desirable"].item() == pytest.approx(1.0)
    loss.backward()
    assert kl_pi.grad is None and pi.grad is not None  # z0 carries no gradient
    pi = pi.detach()
    clamped = kto_loss(pi, ref, T([-6.0]), T([-5.0]), desirable, beta=1.0)[1]["kl/reference_point"]
    assert clamped.item() == 0.0  # max(0, -1)
    only_bad = kto_loss(pi[1:], ref[1:], kl_pi.detach(), kl_ref, T([False]))[1]
    assert math.isnan(only_bad["rewards/desirable"].item())


def test_chosen_nll_is_sequence_mean_of_token_mean():
    assert chosen_nll(T([-4.0, -9.0]), T([2, 3])).item() == pytest.approx((2.0 + 3.0) / 2)


def test_registry_lists_valid_names_and_reads_defaults():
    assert {"sigmoid", "cdpo", "robust", "ipo", "hinge", "simpo", "orpo", "kto"} <= set(PREFERENCE_LOSSES)
    with pytest.raises(ValueError, match="valid: .*sigmoid"):
        get_preference_loss("dpoo")
    simpo = get_preference_loss("simpo")
    assert simpo.params == {"beta": 2.0, "target_margin": 1.0}
    assert not simpo.reference and simpo.average and simpo.paired
    assert not get_preference_loss("kto").paired and get_preference_loss("ipo").average


def test_register_a_custom_loss():
    @register_preference_loss("test_square")
    def square(pi_w, pi_l, ref_w, ref_l, *, beta: float = 1.0):
        h = (pi_w - ref_w) - (pi_l - ref_l)
        return ((1 - beta * h) ** 2).mean(), {}

    try:
        spec = get_preference_loss("test_square")
        assert spec.params == {"beta": 1.0} and spec.fn is square
    finally:
        PREFERENCE_LOSSES.pop("test_square")
