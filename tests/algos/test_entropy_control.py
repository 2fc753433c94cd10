"""Adaptive entropy coefficient (band controller) and the high-entropy token mask."""

from __future__ import annotations

import pytest
import torch

from posttrain.algos.entropy import adaptive_entropy_coef, high_entropy_mask

BAND = {"low": 0.5, "high": 1.0, "delta": 0.01, "coef_min": 0.0, "coef_max": 0.03}


def test_band_controller_moves_toward_the_band():
    assert adaptive_entropy_coef(0.01, 0.2, **BAND) == pytest.approx(0.02)  # below: more bonus
    assert adaptive_entropy_coef(0.01, 1.5, **BAND) == pytest.approx(0.0)  # above: less
    assert adaptive_entropy_coef(0.01, 0.7, **BAND) == 0.01  # inside: unchanged
    assert adaptive_entropy_coef(0.025, 0.2, **BAND) == pytest.approx(0.03)  # clamped at coef_max
    assert adaptive_entropy_coef(0.0, 2.0, **BAND) == 0.0  # and at coef_min
    with pytest.raises(ValueError, match="lower bound"):
        adaptive_entropy_coef(0.01, 0.7, **{**BAND, "low": 2.0})


def test_high_entropy_mask_keeps_the_top_fraction_of_masked_tokens():
    ent = torch.tensor([[0.1, 0.9, 0.5, 7.0], [0.3, 0.8, 0.2, 0.4]])
    mask = torch.tensor([[1.0, 1.0, 1.0, 0.0], [1.0, 1.0, 1.0, 1.0]])  # 7.0 is padding
    keep = high_entropy_mask(ent, mask, 2 / 7)
    # 7 masked tokens; quantile 5/7 -> the two largest masked entropies (0.9, 0.8) are kept
    assert keep.tolist() == [[0, 1, 0, 0], [0, 1, 0, 0]]
    assert high_entropy_mask(ent, mask, 1.0).tolist() == mask.tolist()
