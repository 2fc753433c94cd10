"""The newer RL losses through the trainer, and their bad-input errors."""

from __future__ import annotations

import json

import pytest
import torch

from posttrain.config import load_recipe
from posttrain.errors import ConfigError
from posttrain.rewards.registry import register_reward
from posttrain.train.rl import RLRecipe, run_rl


@register_reward("rl_alg_digits", replace=True)
def digit_share(prompts, completions, metadata):
    """Share of the completion's characters that are digits: dense, so every group has variance."""
    return [sum(ch.isdigit() for ch in c) / max(len(c), 1) for c in completions]


def recipe(model_dir, out, *extra) -> RLRecipe:
    base = [
        f"model.path={model_dir}", f"output_dir={out}", "data.tasks=[arith]", "data.levels=[1,2]",
        "data.n_per_level=16", "rewards=[{name: rl_alg_digits}]", "rollout.prompts_per_step=4",
        "rollout.n=4", "rollout.max_new_tokens=8", "eval.n_per_level=0", "optim.lr=1e-2",
        "train.max_steps=2", "train.tensorboard=false",
    ]  # fmt: skip
    return load_recipe(RLRecipe, None, [*base, *extra])


def metrics(out) -> list[dict]:
    return [json.loads(ln) for ln in (out / "metrics.jsonl").read_text().splitlines()]


LOSSES = {
    "gspo": ["algorithm.loss_agg=seq-mean-token-mean", "algorithm.clip_low=3e-4", "algorithm.clip_high=4e-4"],
    "cispo": ["algorithm.clip_low=1.0", "algorithm.clip_high=4.0"],
    "gmpo": ["algorithm.loss_agg=seq-mean-token-mean", "algorithm.clip_low=0.4", "algorithm.clip_high=0.4"],
    "sapo": ["algorithm.sapo_tau_neg=1.5"],
    "dppo": ["algorithm.dppo_divergence=kl"],
    "kl_cov": ["algorithm.cov_frac=0.05"],
}  # fmt: skip


@pytest.mark.parametrize("name", list(LOSSES))
def test_each_new_loss_trains(tmp_path, tiny_model_dir, name):
    """Two steps with 2 mini-batches (the second one is off-policy): finite loss, weights moved."""
    out = tmp_path / name
    extra = [f"algorithm.policy_loss={name}", "algorithm.mini_batches=2", *LOSSES[name]]
    run_rl(recipe(tiny_model_dir, out, *extra))
    rows = metrics(out)
    assert [r["step"] for r in rows] == [1, 2]
    for r in rows:
        assert torch.isfinite(torch.tensor([r["loss/policy"], r["grad_norm"]])).all()
        assert r["grad_norm"] > 0


def test_sequence_loss_with_a_token_sum_aggregation_is_a_config_error(tmp_path, tiny_model_dir):
    for loss in ("gspo", "gmpo"):
        with pytest.raises(ConfigError) as err:
            recipe(
                tiny_model_dir,
                tmp_path,
                f"algorithm.policy_loss={loss}",
                "algorithm.loss_agg=seq-mean-token-sum",
            )
        assert err.value.where == "algorithm.loss_agg"
