"""Entropy control: an adaptive entropy-bonus coefficient that holds the policy's entropy in a
band, and the "80/20" high-entropy-token mask. Pure functions over floats and (B, T) tensors."""

from __future__ import annotations

import torch


def adaptive_entropy_coef(
    coef: float, entropy: float, *, low: float, high: float, delta: float, coef_min: float, coef_max: float
) -> float:
    """One step of the band controller: c <- min(c + delta, coef_max) if H < low,
    max(c - delta, coef_min) if H > high, else c (H: the last step's mean token entropy).

    A collapsing entropy (too little exploration) raises the bonus; an entropy above the band
    (the policy spreading into noise) lowers it toward coef_min. Needs low <= high.
    """
    if low > high:
        raise ValueError(f"entropy band lower bound {low} > upper bound {high}")
    if entropy < low:
        return min(coef + delta, coef_max)
    if entropy > high:
        return max(coef - delta, coef_min)
    return coef


def high_entropy_mask(entropy: torch.Tensor, mask: torch.Tensor, frac: float) -> torch.Tensor:
    """(B, T) 0/1: the masked tokens whose entropy is in the top ``frac`` of the batch's masked tokens.

    Wang et al. 2025 ("Beyond the 80/20 rule"): the policy gradient on the ~20% highest-entropy
    "forking" tokens alone matches or beats full-gradient RLVR. Threshold = the (1 - frac)
    quantile of the masked entropies (ties at the threshold kept), over the batch this sees.
    """
    m = mask.bool()
    if not m.any():
        return torch.zeros_like(mask)
    threshold = torch.quantile(entropy.detach()[m].float(), 1.0 - frac)
    return (m & (entropy.detach() >= threshold)).to(mask.dtype)
