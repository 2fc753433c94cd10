"""Sampler/trainer mismatch metrics and correction weights: hand values and a loop reference."""

from __future__ import annotations

import math

import pytest
import torch

from posttrain.algos.rollout_correction import correction_weights, mismatch_metrics

TRAINER = torch.tensor([[-1.0, -2.0, -0.5], [-0.1, -3.0, 0.0]], dtype=torch.float64)
D = torch.tensor([[0.1, -0.3, 0.0], [0.5, 0.0, 9.9]], dtype=torch.float64)  # trainer - sampler
SAMPLER = TRAINER - D
MASK = torch.tensor([[1, 1, 1], [1, 1, 0]])


def test_mismatch_metrics_hand_values():
    m = mismatch_metrics(TRAINER, SAMPLER, MASK)
    d = [0.1, -0.3, 0.0, 0.5, 0.0]  # the masked tokens (9.9 is padding)
    assert m["mismatch/token_abs_diff_mean"].item() == pytest.approx(0.9 / 5)
    assert m["mismatch/token_diff_mean"].item() == pytest.approx(0.3 / 5)
    assert m["mismatch/ratio_mean"].item() == pytest.approx(sum(math.exp(x) for x in d) / 5)
    assert m["mismatch/ratio_max"].item() == pytest.approx(math.exp(0.5))
    # exp(-0.3) = 0.74 and exp(0.5) = 1.65 are outside [0.8, 1.25]; exp(0.1) = 1.105 is inside
    assert m["mismatch/ratio_outside_frac"].item() == pytest.approx(2 / 5)
    assert m["mismatch/k3_kl"].item() == pytest.approx(sum(math.exp(x) - 1 - x for x in d) / 5)
    assert m["mismatch/seq_abs_diff_mean"].item() == pytest.approx((0.2 + 0.5) / 2)
    assert m["mismatch/seq_ratio_max"].item() == pytest.approx(math.exp(0.5))


def test_same_numbers_give_no_mismatch():
    m = mismatch_metrics(TRAINER, TRAINER.clone(), MASK)
    assert m["mismatch/token_abs_diff_mean"] == 0 and m["mismatch/ratio_outside_frac"] == 0
    assert m["mismatch/ratio_mean"].item() == pytest.approx(1.0)


def loop_weights(level, mode, cap):
    out = torch.zeros_like(D)
    for r in range(2):
        toks = [t for t in range(3) if MASK[r, t]]
        for t in toks:
            if level == "token":
                w = math.exp(D[r, t].item())
            elif level == "sequence":
                w = math.exp(sum(D[r, u].item() for u in toks))
            else:
                w = math.exp(sum(D[r, u].item() for u in toks) / len(toks))
            out[r, t] = min(w, cap) if mode == "truncate" else (w if w <= cap else 0.0)
    return out


@pytest.mark.parametrize("level", ["token", "sequence", "geometric"])
@pytest.mark.parametrize("mode", ["truncate", "mask"])
def test_weights_match_loop(level, mode):
    cap = 1.2
    w, metrics = correction_weights(TRAINER, SAMPLER, MASK, level=level, mode=mode, cap=cap)
    assert torch.allclose(w, loop_weights(level, mode, cap), atol=1e-12)
    ref = loop_weights(level, "truncate", 1e9)
    assert metrics["correction/capped_frac"].item() == pytest.approx(
        float(((ref > cap) & MASK.bool()).sum()) / 5
    )


def test_weights_are_constants_and_cap_must_exceed_one():
    t = TRAINER.clone().requires_grad_()
    w, _ = correction_weights(t, SAMPLER, MASK)
    assert not w.requires_grad
    with pytest.raises(ValueError, match="cap must be > 1"):
        correction_weights(TRAINER, SAMPLER, MASK, cap=1.0)
