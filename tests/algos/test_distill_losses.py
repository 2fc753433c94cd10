"""Distillation losses: hand values on a 1x1x3 example, python-loop references, limits, gradients."""

from __future__ import annotations

import math

import pytest
import torch

from posttrain.algos.distill_losses import (
    distill_loss,
    forward_kl_loss,
    jsd_loss,
    reverse_kl_loss,
    token_divergence,
    topk_distill_loss,
)

P = [0.5, 0.25, 0.25]  # teacher
Q = [1 / 3, 1 / 3, 1 / 3]  # student


def _logits(probs):
    return torch.tensor([[probs]]).log()  # (1, 1, 3)


ONE = torch.ones(1, 1)


def test_hand_values_1x1x3():
    s, t = _logits(Q), _logits(P)
    fwd = 0.5 * math.log(1.5) + 0.5 * math.log(0.75)  # sum p log(p / q)
    rev = (1 / 3) * math.log(32 / 27)  # sum q log(q / p)
    # m = (p + q) / 2 = [5/12, 7/24, 7/24]
    jsd = 0.5 * (0.5 * math.log(6 / 5) + 0.5 * math.log(6 / 7)) + 0.5 * (
        (1 / 3) * math.log(4 / 5) + (2 / 3) * math.log(8 / 7)
    )
    assert float(forward_kl_loss(s, t, ONE)[0]) == pytest.approx(fwd, rel=1e-5)
    assert float(reverse_kl_loss(s, t, ONE)[0]) == pytest.approx(rev, rel=1e-5)
    assert float(jsd_loss(s, t, ONE, beta=0.5)[0]) == pytest.approx(jsd, rel=1e-5)
    # beta = 0.25: m = 0.25 p + 0.75 q = [3/8, 5/16, 5/16]
    jsd25 = 0.25 * (0.5 * math.log(4 / 3) + 0.5 * math.log(4 / 5)) + 0.75 * (
        (1 / 3) * math.log(8 / 9) + (2 / 3) * math.log(16 / 15)
    )
    assert float(jsd_loss(s, t, ONE, beta=0.25)[0]) == pytest.approx(jsd25, rel=1e-5)


def test_temperature_divides_both_logits():
    s, t = _logits(Q), _logits(P)
    for kind in ("forward_kl", "reverse_kl", "jsd"):
        plain = distill_loss(s, t, ONE, kind=kind)[0]
        hot = distill_loss(2 * s, 2 * t, ONE, kind=kind, temperature=2.0)[0]
        assert float(hot) == pytest.approx(float(plain), rel=1e-5)
    # at tau = 2 the teacher [0.5, .25, .25] becomes ~ sqrt(p) renormalised: a different value
    assert float(forward_kl_loss(s, t, ONE, temperature=2.0)[0]) < float(forward_kl_loss(s, t, ONE)[0])


def test_topk_hand_value():
    # teacher's top-2 of [0.5, 0.25, 0.25]: tokens 0, 1 -> renormalised [2/3, 1/3]; student on {0, 1}: [1/2, 1/2]
    idx = torch.tensor([[[0, 1]]])
    logp = torch.tensor([[[math.log(0.5), math.log(0.25)]]])
    s = _logits(Q)
    fwd = (2 / 3) * math.log(4 / 3) + (1 / 3) * math.log(2 / 3)
    rev = 0.5 * math.log(0.75) + 0.5 * math.log(1.5)
    assert float(topk_distill_loss(s, idx, logp, ONE, kind="forward_kl")[0]) == pytest.approx(fwd, rel=1e-5)
    assert float(topk_distill_loss(s, idx, logp, ONE, kind="reverse_kl")[0]) == pytest.approx(rev, rel=1e-5)


def _loop_divergence(s_logits, t_logits, kind, beta, tau):
    """Plain-python reference of one token's divergence."""

    def softmax(z):
        mx = max(z)
        e = [math.exp((x - mx) / tau) for x in z]
        return [x / sum(e) for x in e]

    p, q = softmax(t_logits), softmax(s_logits)
    kl = lambda a, b: sum(x * math.log(x / y) for x, y in zip(a, b, strict=True) if x > 0)  # noqa: E731
    if kind == "forward_kl":
        return kl(p, q)
    if kind == "reverse_kl":
        return kl(q, p)
    m = [beta * x + (1 - beta) * y for x, y in zip(p, q, strict=True)]
    return beta * kl(p, m) + (1 - beta) * kl(q, m)


@pytest.mark.parametrize("kind,beta", [("forward_kl", 0.5), ("reverse_kl", 0.5), ("jsd", 0.3), ("jsd", 0.9)])
@pytest.mark.parametrize("agg", ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum"])
def test_matches_loop_reference(kind, beta, agg):
    g = torch.Generator().manual_seed(0)
    b, t, v, tau, norm = 3, 5, 7, 1.7, 4.0
    s, te = torch.randn(b, t, v, generator=g) * 2, torch.randn(b, t, v, generator=g) * 2
    mask = (torch.rand(b, t, generator=g) > 0.3).float()
    mask[0, 0] = 1.0
    loss, metrics = distill_loss(s, te, mask, kind=kind, beta=beta, temperature=tau, agg=agg, norm=norm)
    per = [
        [_loop_divergence(s[i, j].tolist(), te[i, j].tolist(), kind, beta, tau) for j in range(t)]
        for i in range(b)
    ]
    m = mask.tolist()
    if agg == "token-mean":
        ref = sum(per[i][j] * m[i][j] for i in range(b) for j in range(t)) / sum(map(sum, m))
    else:
        rows = []
        for i in range(b):
            total, n = sum(per[i][j] * m[i][j] for j in range(t)), sum(m[i])
            rows.append(total / max(n, 1) if agg == "seq-mean-token-mean" else total / norm)
        ref = sum(rows) / b
    assert float(loss) == pytest.approx(ref, rel=1e-5)
    tok_mean = sum(per[i][j] * m[i][j] for i in range(b) for j in range(t)) / sum(map(sum, m))
    assert float(metrics[f"distill/{kind}_token_mean"]) == pytest.approx(tok_mean, rel=1e-5)


def test_topk_matches_loop_reference_and_full_at_k_equals_v():
    g = torch.Generator().manual_seed(1)
    b, t, v, k = 2, 4, 9, 3
    s, te = torch.randn(b, t, v, generator=g), torch.randn(b, t, v, generator=g)
    mask = torch.ones(b, t)
    t_logp = torch.log_softmax(te, -1)
    top = t_logp.topk(k, dim=-1)
    for kind, beta in (("forward_kl", 0.5), ("reverse_kl", 0.5), ("jsd", 0.4)):
        loss, _ = topk_distill_loss(s, top.indices, top.values, mask, kind=kind, beta=beta, temperature=1.3)
        ref = 0.0
        for i in range(b):
            for j in range(t):
                ids = top.indices[i, j].tolist()
                ref += _loop_divergence(
                    [float(s[i, j, x]) for x in ids], [float(t_logp[i, j, x]) for x in ids], kind, beta, 1.3
                )
        assert float(loss) == pytest.approx(ref / (b * t), rel=1e-5)
        full_top = t_logp.topk(v, dim=-1)
        all_k = topk_distill_loss(s, full_top.indices, full_top.values, mask, kind=kind, beta=beta)[0]
        assert float(all_k) == pytest.approx(
            float(distill_loss(s, te, mask, kind=kind, beta=beta)[0]), rel=1e-5
        )


def test_beta_limits_reduce_to_the_kls():
    g = torch.Generator().manual_seed(2)
    s, te = torch.randn(2, 3, 6, generator=g), torch.randn(2, 3, 6, generator=g)
    fwd = token_divergence(s, te, kind="forward_kl")
    rev = token_divergence(s, te, kind="reverse_kl")
    assert torch.equal(token_divergence(s, te, kind="jsd", beta=0.0), fwd)
    assert torch.equal(token_divergence(s, te, kind="jsd", beta=1.0), rev)
    # continuity of the scaled form: JSD_beta / beta -> KL(p || q), JSD_beta / (1 - beta) -> KL(q || p)
    eps = 1e-3
    assert torch.allclose(token_divergence(s, te, kind="jsd", beta=eps) / eps, fwd, rtol=2e-2, atol=1e-3)
    assert torch.allclose(token_divergence(s, te, kind="jsd", beta=1 - eps) / eps, rev, rtol=2e-2, atol=1e-3)


def test_identical_distributions_give_zero():
    z = torch.randn(2, 4, 8, generator=torch.Generator().manual_seed(3))
    for kind, beta in (("forward_kl", 0.5), ("reverse_kl", 0.5), ("jsd", 0.5), ("jsd", 0.1)):
        assert float(distill_loss(z, z.clone(), torch.ones(2, 4), kind=kind, beta=beta)[0]) == pytest.approx(
            0.0, abs=1e-6
        )
        top = torch.log_softmax(z, -1).topk(3, -1)
        # the student is the teacher: renormalised over the same support they are equal too
        assert float(
            topk_distill_loss(z, top.indices, top.values, torch.ones(2, 4), kind=kind)[0]
        ) == pytest.approx(0.0, abs=1e-6)


def test_gradient_reaches_the_student_only_and_mask_excludes():
    g = torch.Generator().manual_seed(4)
    s = torch.randn(2, 3, 5, generator=g, requires_grad=True)
    te = torch.randn(2, 3, 5, generator=g, requires_grad=True)
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 0.0, 0.0]])
    for kind in ("forward_kl", "reverse_kl", "jsd"):
        s.grad = None
        loss, _ = distill_loss(s, te, mask, kind=kind, beta=0.5)
        loss.backward()
        assert te.grad is None
        assert s.grad[mask.bool()].abs().sum() > 0
        assert torch.all(s.grad[~mask.bool()] == 0)
    idx = torch.log_softmax(te.detach(), -1).topk(2, -1)
    s.grad = None
    logp = idx.values.clone().requires_grad_(True)
    topk_distill_loss(s, idx.indices, logp, mask)[0].backward()
    assert logp.grad is None and s.grad[mask.bool()].abs().sum() > 0


def test_unknown_kind_and_bad_beta():
    z = torch.zeros(1, 1, 3)
    with pytest.raises(ValueError, match="valid: forward_kl, reverse_kl, jsd"):
        distill_loss(z, z, ONE, kind="tvd")
    with pytest.raises(ValueError, match="beta"):
        distill_loss(z, z, ONE, kind="jsd", beta=1.5)
