"""Advantage estimators: hand-computed values and plain-Python loop references (vectorised == loop)."""

from __future__ import annotations

import math
import statistics

import pytest
import torch

from posttrain.algos.advantages import (
    ADVANTAGES,
    compute_advantages,
    dr_grpo_advantages,
    gae_advantages,
    get_advantage,
    grpo_advantages,
    register_advantage,
    reinforce_advantages,
    reinforce_baseline_advantages,
    reinforce_pp_advantages,
    returns_to_go,
    rloo_advantages,
)


def random_batch(seed: int, b: int = 6, t: int = 7):
    """Rewards, values, a left/right-padded mask and groups of 3 (one group has equal scores)."""
    g = torch.Generator().manual_seed(seed)
    rewards = torch.randn(b, t, generator=g, dtype=torch.float64)
    values = torch.randn(b, t, generator=g, dtype=torch.float64)
    mask = torch.zeros(b, t, dtype=torch.long)
    for i in range(b):
        start = int(torch.randint(0, 3, (1,), generator=g))
        end = int(torch.randint(start + 1, t + 1, (1,), generator=g))
        mask[i, start:end] = 1
    group = torch.tensor([i // 3 for i in range(b)])
    return rewards, values, mask, group


# ---- plain-Python references: one row, one token at a time -------------------------------------


def loop_returns(rewards, mask, gamma):
    out = []
    for r_row, m_row in zip(rewards.tolist(), mask.tolist(), strict=True):
        row, g = [0.0] * len(r_row), 0.0
        for t in reversed(range(len(r_row))):
            g = r_row[t] * m_row[t] + gamma * g
            row[t] = g * m_row[t]
        out.append(row)
    return out


def loop_gae(rewards, values, mask, gamma, lam):
    adv_out, ret_out = [], []
    for r_row, v_row, m_row in zip(rewards.tolist(), values.tolist(), mask.tolist(), strict=True):
        idx = [t for t, m in enumerate(m_row) if m]  # contiguous completion tokens
        adv, ret = [0.0] * len(r_row), [0.0] * len(r_row)
        last = 0.0
        for k in reversed(range(len(idx))):
            t = idx[k]
            next_v = v_row[idx[k + 1]] if k + 1 < len(idx) else 0.0
            delta = r_row[t] + gamma * next_v - v_row[t]
            last = delta + gamma * lam * last
            adv[t], ret[t] = last, last + v_row[t]
        adv_out.append(adv)
        ret_out.append(ret)
    return adv_out, ret_out


def loop_group(rewards, mask, group, kind, eps=1e-6):
    scores = [
        sum(r * m for r, m in zip(rr, mm, strict=True))
        for rr, mm in zip(rewards.tolist(), mask.tolist(), strict=True)
    ]
    out = []
    for i, s in enumerate(scores):
        members = [scores[j] for j in range(len(scores)) if group[j] == group[i]]
        k = len(members)
        mean = sum(members) / k
        if kind == "grpo":
            a = 0.0 if k == 1 else (s - mean) / (statistics.stdev(members) + eps)
        elif kind == "dr_grpo":
            a = s - mean
        else:  # rloo: leave-one-out mean of the others
            a = 0.0 if k == 1 else s - (sum(members) - s) / (k - 1)
        out.append([a * m for m in mask[i].tolist()])
    return out


def loop_reinforce_pp(rewards, mask, gamma, eps=1e-8):
    ret = loop_returns(rewards, mask, gamma)
    vals = [ret[i][t] for i in range(len(ret)) for t in range(len(ret[i])) if mask[i][t]]
    mean = sum(vals) / len(vals)
    std = math.sqrt(sum((v - mean) ** 2 for v in vals) / len(vals))
    return [
        [(ret[i][t] - mean) / (std + eps) * int(mask[i][t]) for t in range(len(ret[i]))]
        for i in range(len(ret))
    ]


def loop_reinforce_baseline(rewards, mask, gamma):
    ret = loop_returns(rewards, mask, gamma)
    firsts = [row[m.index(1)] for row, m in zip(ret, mask.tolist(), strict=True) if 1 in m]
    b = sum(firsts) / len(firsts)
    return [[(ret[i][t] - b) * int(mask[i][t]) for t in range(len(ret[i]))] for i in range(len(ret))]


def close(tensor, expected, tol=1e-9):
    assert torch.allclose(tensor, torch.tensor(expected, dtype=tensor.dtype), atol=tol), (tensor, expected)


# ---- vectorised == loop --------------------------------------------------------------------------


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("gamma,lam", [(1.0, 0.95), (0.9, 0.8), (0.99, 1.0)])
def test_gae_matches_loop(seed, gamma, lam):
    rewards, values, mask, _ = random_batch(seed)
    adv, ret, _ = gae_advantages(rewards, values, mask, gamma=gamma, lam=lam)
    ref_adv, ref_ret = loop_gae(rewards, values, mask, gamma, lam)
    close(adv, ref_adv)
    close(ret, ref_ret)


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("kind", ["grpo", "dr_grpo", "rloo"])
def test_group_estimators_match_loop(seed, kind):
    rewards, _, mask, group = random_batch(seed)
    rewards[3:6] = 0.0  # one group with equal scores: zero advantages, no NaN
    adv, _, metrics = compute_advantages(kind, rewards, mask, group=group)
    close(adv, loop_group(rewards, mask, group.tolist(), kind))
    assert metrics["advantages/zero_frac"] == pytest.approx(0.5)


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("gamma", [1.0, 0.9])
def test_reinforce_family_matches_loop(seed, gamma):
    rewards, _, mask, _ = random_batch(seed)
    close(returns_to_go(rewards, mask, gamma), loop_returns(rewards, mask, gamma))
    close(reinforce_advantages(rewards, mask, gamma=gamma)[0], loop_returns(rewards, mask, gamma))
    close(
        reinforce_baseline_advantages(rewards, mask, gamma=gamma)[0],
        loop_reinforce_baseline(rewards, mask, gamma),
    )
    close(
        reinforce_pp_advantages(rewards, mask, gamma=gamma)[0],
        loop_reinforce_pp(rewards, mask, gamma),
        tol=1e-7,
    )


# ---- hand-computed values ------------------------------------------------------------------------


def outcome(scores, t=3):
    """Outcome rewards on the last of t completion tokens."""
    rewards = torch.zeros(len(scores), t, dtype=torch.float64)
    rewards[:, -1] = torch.tensor(scores, dtype=torch.float64)
    return rewards, torch.ones(len(scores), t, dtype=torch.long)


def test_grpo_hand_values():
    rewards, mask = outcome([1.0, 0.0, 0.0, 1.0, 2.0])
    group = torch.tensor([0, 0, 0, 0, 1])
    adv, ret, _ = grpo_advantages(rewards, mask, group, eps=0.0)
    std = math.sqrt(1 / 3)  # unbiased std of [1, 0, 0, 1] = sqrt(1/3)
    close(adv[:, 0], [0.5 / std, -0.5 / std, -0.5 / std, 0.5 / std, 0.0])
    close(ret[:, 0], [1.0, 0.0, 0.0, 1.0, 2.0])
    assert (adv == adv[:, :1]).all()  # one advantage per row, on every token


def test_dr_grpo_and_rloo_hand_values():
    rewards, mask = outcome([1.0, 0.0, 0.0, 1.0])
    group = torch.zeros(4, dtype=torch.long)
    close(dr_grpo_advantages(rewards, mask, group)[0][:, 0], [0.5, -0.5, -0.5, 0.5])
    # RLOO: 1 - (0 + 0 + 1) / 3 = 2/3; 0 - (1 + 0 + 1) / 3 = -2/3
    close(rloo_advantages(rewards, mask, group)[0][:, 0], [2 / 3, -2 / 3, -2 / 3, 2 / 3])


def test_gae_hand_values():
    rewards = torch.tensor([[0.0, 0.0, 1.0]], dtype=torch.float64)
    values = torch.tensor([[0.5, 0.25, 0.5]], dtype=torch.float64)
    mask = torch.ones(1, 3, dtype=torch.long)
    adv, ret, _ = gae_advantages(rewards, values, mask, gamma=1.0, lam=0.5)
    # deltas: 0 + .25 - .5 = -.25; 0 + .5 - .25 = .25; 1 + 0 - .5 = .5
    # A2 = .5; A1 = .25 + .5 * .5 = .5; A0 = -.25 + .5 * .5 = 0
    close(adv, [[0.0, 0.5, 0.5]])
    close(ret, [[0.5, 0.75, 1.0]])
    # lam = 1: A_t = return - V_t (Monte Carlo advantage)
    close(gae_advantages(rewards, values, mask, gamma=1.0, lam=1.0)[0], [[0.5, 0.75, 0.5]])


def test_reinforce_hand_values():
    rewards = torch.tensor([[1.0, 0.0, 2.0], [0.0, 4.0, 0.0]], dtype=torch.float64)
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]])
    close(reinforce_advantages(rewards, mask, gamma=0.5)[0], [[1.5, 1.0, 2.0], [2.0, 4.0, 0.0]])
    # baseline = mean of row returns (1.5, 2.0) = 1.75
    close(
        reinforce_baseline_advantages(rewards, mask, gamma=0.5)[0], [[-0.25, -0.75, 0.25], [0.25, 2.25, 0.0]]
    )
    adv, _, _ = reinforce_pp_advantages(rewards, mask, gamma=0.5)
    m = mask.bool()
    assert adv[m].mean().abs() < 1e-9 and (adv[m].std(unbiased=False) - 1).abs() < 1e-6
    assert adv[~m].abs().sum() == 0


# ---- registry ------------------------------------------------------------------------------------


def test_registry_lists_estimators_and_rejects_unknown():
    assert {"gae", "grpo", "dr_grpo", "rloo", "reinforce", "reinforce_baseline", "reinforce_pp"} <= set(
        ADVANTAGES
    )
    with pytest.raises(ValueError, match="valid: .*grpo"):
        get_advantage("grp0")


def test_compute_advantages_checks_inputs_and_filters_hparams():
    rewards, mask = outcome([1.0, 0.0])
    with pytest.raises(ValueError, match="needs a critic"):
        compute_advantages("gae", rewards, mask)
    with pytest.raises(ValueError, match="needs group ids"):
        compute_advantages("grpo", rewards, mask)
    # gamma / lam are GAE's; GRPO ignores them rather than failing
    adv, _, _ = compute_advantages("grpo", rewards, mask, group=torch.zeros(2), gamma=0.9, lam=0.9, eps=0.0)
    assert adv[0, 0] > 0 > adv[1, 0]


def test_register_custom_estimator():
    @register_advantage("test_const")
    def const(token_rewards, mask, *, scale: float = 1.0):
        adv = mask.to(token_rewards.dtype) * scale
        return adv, adv, {}

    try:
        adv, _, _ = compute_advantages("test_const", *outcome([1.0]), scale=3.0, gamma=0.5)
        assert adv.sum() == 9.0
    finally:
        ADVANTAGES.pop("test_const")


# ---- step-aware GRPO (process rewards) ------------------------------------------------------------


def loop_grpo_process(rewards, steps, step_mask, mask, group, eps):
    """Outcome z-score per group + per-token sum of the group-normalised step rewards at or after t."""
    b, t = rewards.shape
    at = [[bool(step_mask[i, j]) and bool(mask[i, j]) for j in range(t)] for i in range(b)]
    outcome = [
        sum((rewards[i, j] - steps[i, j] * mask[i, j]) * mask[i, j] for j in range(t)) for i in range(b)
    ]
    adv = [[0.0] * t for _ in range(b)]
    for g in set(group.tolist()):
        rows = [i for i in range(b) if group[i] == g]
        scores = [float(outcome[i]) for i in rows]
        step_vals = [float(steps[i, j]) for i in rows for j in range(t) if at[i][j]]
        for i in rows:
            a_o = (
                (float(outcome[i]) - statistics.mean(scores)) / (statistics.stdev(scores) + eps)
                if len(rows) > 1
                else 0.0
            )
            for j in range(t):
                if not mask[i, j]:
                    continue
                later = [float(steps[i, k]) for k in range(j, t) if at[i][k]]
                if len(step_vals) > 1:
                    mu, sd = statistics.mean(step_vals), statistics.stdev(step_vals)
                    later = [(v - mu) / (sd + eps) for v in later]
                else:
                    later = [0.0 for _ in later]
                adv[i][j] = a_o + sum(later)
    return torch.tensor(adv, dtype=torch.float64)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_grpo_process_matches_loop(seed):
    rewards, _, mask, group = random_batch(seed)
    g = torch.Generator().manual_seed(100 + seed)
    step_mask = (torch.rand(rewards.shape, generator=g) < 0.3) & mask.bool()
    steps = torch.rand(rewards.shape, generator=g, dtype=torch.float64) * step_mask
    rewards = rewards + steps  # token rewards include the step rewards
    adv, _, metrics = compute_advantages(
        "grpo_process", rewards, mask, group=group, step_rewards=steps, step_mask=step_mask, eps=1e-6
    )
    assert torch.allclose(adv, loop_grpo_process(rewards, steps, step_mask, mask, group, 1e-6), atol=1e-9)
    assert metrics["advantages/steps"] == step_mask.sum()


def test_grpo_process_hand_values_and_reduces_to_grpo():
    # two rows of one group; steps 0.8 (t0), 0.6 (t2) in row 0 and 0.2 (t1) in row 1; outcome 1 vs 0
    steps = torch.tensor([[0.8, 0.0, 0.6], [0.0, 0.2, 0.0]], dtype=torch.float64)
    step_mask = steps > 0
    rewards = steps + torch.tensor([[0.0, 0.0, 1.0], [0.0, 0.0, 0.0]], dtype=torch.float64)
    mask, group = torch.ones(2, 3, dtype=torch.long), torch.zeros(2)
    adv, _, _ = compute_advantages(
        "grpo_process", rewards, mask, group=group, step_rewards=steps, step_mask=step_mask, eps=0.0
    )
    # outcome: +-1/sqrt(2); steps {.8, .6, .2}: mean .5333, sd .30551 -> .8729, .2182, -1.0911
    a, s8, s6, s2 = 0.5**0.5, 0.8729, 0.2182, -1.0911
    close(adv, [[a + s8 + s6, a + s6, a + s6], [-a + s2, -a + s2, -a]], tol=1e-4)
    plain, _, _ = grpo_advantages(rewards, mask, group)
    assert torch.allclose(compute_advantages("grpo_process", rewards, mask, group=group)[0], plain)
