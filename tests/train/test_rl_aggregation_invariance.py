"""Aggregation invariance (the trl #6024 class of bug): the gradient of one optimiser step does not
depend on how its rows are cut into micro-batches, for every aggregation mode and policy loss, and
the mini-batches of one PPO epoch (each normalised by its own tokens or rows) add up, weighted by
their share, to the full batch's gradient."""

from __future__ import annotations

import itertools
import random

import pytest
import torch

from posttrain.algos.aggregate import AGG_MODES
from posttrain.algos.policy_losses import POLICY_LOSSES, SEQUENCE_LOSSES
from posttrain.models.load import load_model, load_tokenizer
from posttrain.rollout.engine import Completion
from posttrain.train.rl_data import Scored, rollout_tensors
from posttrain.train.rl_update import AlgorithmConfig, accumulate, micro_share, ppo_update, score_rollout

ROWS = 16
BATCH_DEPENDENT = {"kl_cov"}  # selects tokens by a covariance over the batch it sees: not invariant


@pytest.fixture(scope="module")
def setup(tiny_model_dir):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # ~200 small passes: two threads on a loaded 2-core box spin 10-50x slower
    yield build(tiny_model_dir)
    torch.set_num_threads(threads)


def build(tiny_model_dir):
    model, tok = load_model(tiny_model_dir), load_tokenizer(tiny_model_dir)
    model.float().train()
    rng = random.Random(0)
    groups = []
    for g in range(ROWS // 4):
        comps = []
        for i in range(4):
            n = rng.randint(2, 9)  # ragged lengths: token-mean and seq-mean weigh rows differently
            comps.append(
                Completion(
                    g,
                    i,
                    [rng.randrange(3, 290) for _ in range(rng.randint(3, 6))],
                    [rng.randrange(3, 290) for _ in range(n)],
                    "",
                    [0.0] * n,
                    "length" if i == 3 else "stop",
                )  # fmt: skip
            )
        groups.append(Scored({}, comps, [0.0] * 4, [[] for _ in comps], [{} for _ in comps]))
    data = rollout_tensors(groups, tok.pad_token_id, overlong_filter=True)  # row 3 of each group: no loss
    g = torch.Generator().manual_seed(1)
    logp, _ = score_rollout(model, None, data, temperature=1.0, rows_per_pass=ROWS)
    valid = data["valid"].float()
    # off-policy old log-probs (ratios up to ~e^0.4: the clips act), a reference, per-row advantages
    data["old_logp"] = (logp + 0.2 * torch.randn(logp.shape, generator=g)) * valid
    data["ref_logp"] = (logp + 0.1 * torch.randn(logp.shape, generator=g)) * valid
    data["advantages"] = torch.randn(ROWS, 1, generator=g).expand_as(logp) * valid
    return model, data


def grads_of(model):
    return torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])


def step_gradient(model, data, algo, rows):
    model.zero_grad(set_to_none=True)
    accumulate(
        model, None, data, rows, algo, 0.05, temperature=1.0, norm=10.0, chunk_size=1024,
        entropy_coef=algo.entropy_coef, measure=False,
    )  # fmt: skip
    return grads_of(model)


CASES = [
    (loss, agg)
    for loss, agg in itertools.product(sorted(POLICY_LOSSES), AGG_MODES)
    if loss not in BATCH_DEPENDENT and not (loss in SEQUENCE_LOSSES and agg == "seq-mean-token-sum")
]


@pytest.mark.parametrize("loss,agg", CASES)
def test_micro_batching_does_not_change_the_gradient(setup, loss, agg):
    """1x16, 2x8, 4x4 and 16x1 micro-batches, and length-sorted passes under a padded-token budget
    (micro_batch_tokens): the same accumulated gradient (policy + KL + entropy)."""
    model, data = setup
    rows = torch.randperm(ROWS, generator=torch.Generator().manual_seed(2))
    ref = None
    for micro, budget in ((1, 0), (2, 0), (4, 0), (16, 0), (1, 40), (1, 64), (3, 64)):
        algo = AlgorithmConfig(
            policy_loss=loss, loss_agg=agg, micro_batches=micro, micro_batch_tokens=budget, entropy_coef=0.01
        )
        g = step_gradient(model, data, algo, rows)
        assert g.abs().sum() > 0
        if ref is None:
            ref = g
        else:
            torch.testing.assert_close(
                g, ref, rtol=1e-4, atol=1e-6, msg=f"{micro} micro-batches, budget {budget}"
            )


def test_length_parts_sort_by_length_and_keep_the_budget():
    from posttrain.train.rl_dist import length_parts, rank_parts

    lengths = torch.tensor([5, 12, 3, 12, 7, 30, 6, 8])
    rows = torch.arange(8)
    parts = length_parts(rows, lengths, budget=24, at_least=1)
    assert [p.tolist() for p in parts] == [[5], [1, 3], [7, 4, 6], [0, 2]]  # 30 alone; 2 x 12; 3 x 8; 2 x 5
    assert all(len(p) * int(lengths[p].max()) <= 24 or len(p) == 1 for p in parts)
    assert sorted(torch.cat(parts).tolist()) == list(range(8))
    # fewer parts than micro_batches asks for: the sorted rows in equal parts
    assert [p.tolist() for p in length_parts(rows, lengths, budget=1000, at_least=3)] == [
        [5, 1, 3],
        [7, 4, 6],
        [0, 2],
    ]
    pieces = rank_parts(rows, 1, lengths, token_budget=24)
    assert [p.tolist() for p, real in pieces] == [p.tolist() for p in parts] and all(r for _, r in pieces)
    # padded tokens computed: 30 + 24 + 24 + 10 = 88 against 8 x 30 = 240 in one pass
    assert sum(len(p) * int(lengths[p].max()) for p in parts) == 88


@pytest.mark.parametrize("agg", AGG_MODES)
@pytest.mark.parametrize("epochs,minis,micro", [(1, 2, 1), (2, 4, 2), (1, 16, 1)])
def test_minibatches_of_an_epoch_add_up_to_the_full_batch(setup, agg, epochs, minis, micro):
    """ppo_update at lr 0 (weights fixed): per epoch, sum_m share_m * grad_m = the one-batch gradient."""
    model, data = setup
    kw = {"loss_agg": agg, "entropy_coef": 0.01}
    algo = AlgorithmConfig(**kw, ppo_epochs=epochs, mini_batches=minis, micro_batches=micro)
    full = step_gradient(model, data, AlgorithmConfig(**kw), torch.arange(ROWS))
    model.zero_grad(set_to_none=True)
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda _: 1.0)
    seen: list[torch.Tensor] = []
    opt.register_step_pre_hook(lambda *_: seen.append(grads_of(model)))
    ppo_update(
        model, model, None, data, opt, sched, algo, 0.05, generator=torch.Generator().manual_seed(3),
        temperature=1.0, norm=10.0, max_grad_norm=0.0, step=1,
    )  # fmt: skip
    assert len(seen) == epochs * minis
    order_gen = torch.Generator().manual_seed(3)
    whole = {"mask": data["mask"]}
    for e in range(epochs):
        parts = torch.randperm(ROWS, generator=order_gen).tensor_split(minis)
        assert sorted(torch.cat(parts).tolist()) == list(range(ROWS))  # every row once per epoch
        total = sum(
            micro_share({"mask": data["mask"][rows]}, whole, agg) * seen[e * minis + m]
            for m, rows in enumerate(parts)
        )
        torch.testing.assert_close(total, full, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("budget", [40, 64])
def test_scoring_in_token_budget_passes_equals_one_pass(setup, budget):
    """No-grad scoring cut into length-sorted passes under a padded-token budget (several passes of
    different widths) gives the log-probs of one pass over every row."""
    from posttrain.train.rl_dist import length_parts

    model, data = setup
    lengths = data["attention_mask"].sum(-1)
    assert len(length_parts(torch.arange(ROWS), lengths, budget, 1)) > 2  # the budget really cuts
    shapes = []
    hook = model.model.register_forward_hook(
        lambda mod, args, kw, out: shapes.append(kw["input_ids"].shape), with_kwargs=True
    )
    try:
        whole, _ = score_rollout(model, None, data, temperature=1.0, rows_per_pass=ROWS)
        assert len(shapes) == 1
        cut, _ = score_rollout(model, None, data, temperature=1.0, rows_per_pass=ROWS, token_budget=budget)
    finally:
        hook.remove()
    assert len(shapes) > 3 and all(r * w <= max(budget, w) for r, w in shapes[1:])  # passes within budget
    valid = data["valid"]
    assert valid.any() and torch.allclose(cut[valid], whole[valid], atol=1e-5)
    assert not cut[~valid].any()
