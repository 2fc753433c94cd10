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
    """The training steps' rows of metrics.jsonl (not eval rows or events)."""
    rows = [json.loads(ln) for ln in (out / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if "loss/total" in r]


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


# ---------------------------------------------------------------- sampler / trainer mismatch


MISMATCH_KEYS = ("mismatch/token_abs_diff_mean", "mismatch/seq_abs_diff_mean", "mismatch/ratio_mean",
                 "mismatch/ratio_max", "mismatch/ratio_outside_frac")  # fmt: skip


def test_mismatch_is_logged_every_step_and_tiny_in_fp32(tmp_path, tiny_model_dir):
    """fp32 sampling, old log-probs from the sampler: measured by the update's first forward."""
    out = tmp_path / "fp32"
    run_rl(recipe(tiny_model_dir, out, "algorithm.mini_batches=2", "train.precision=fp32"))
    for r in metrics(out):
        assert all(k in r for k in MISMATCH_KEYS)
        assert r["mismatch/token_abs_diff_mean"] < 1e-4  # KV-cache decoding vs one forward, fp32
        assert r["mismatch/ratio_outside_frac"] == 0


def test_bf16_sampling_mismatch_and_correction(tmp_path, tiny_model_dir):
    """Sampling under bf16 autocast: old log-probs recomputed in fp32, the gap logged and corrected."""
    out = tmp_path / "bf16"
    extra = [
        "rollout.autocast=bfloat16",
        "algorithm.rollout_correction={level: token, mode: truncate, cap: 1.5}",
        "train.precision=fp32",
    ]
    run_rl(recipe(tiny_model_dir, out, *extra))
    for r in metrics(out):
        assert all(k in r for k in MISMATCH_KEYS)
        assert r["mismatch/token_abs_diff_mean"] > 1e-4  # bf16 logits vs fp32: a real gap (fp32: ~1e-7)
        assert 0 < r["correction/weight_mean"] <= 1.5
        assert r["loss/policy"] == r["loss/policy"]  # finite (not NaN)


def test_control_bad_inputs_are_config_errors(tmp_path, tiny_model_dir):
    cases = {
        "algorithm.rollout_correction={cap: 1.0}": "algorithm.rollout_correction.cap",
        "algorithm.entropy_control={low: 2.0, high: 1.0}": "algorithm.entropy_control.low",
    }
    for override, where in cases.items():
        with pytest.raises(ConfigError) as err:
            recipe(tiny_model_dir, tmp_path, override)
        assert err.value.where == where


# ---------------------------------------------------------------- entropy control


def test_adaptive_entropy_coef_moves_and_is_restored_on_resume(tmp_path, tiny_model_dir):
    """A random tiny model's entropy (~5 nats) is above the band [0.1, 1.0]: the coefficient falls by
    delta each step (0.01 -> 0.006 -> 0.002); a resumed run continues from the checkpointed value."""
    out = tmp_path / "ent"
    extra = ["algorithm.entropy_coef=0.01", "algorithm.entropy_control={low: 0.1, high: 1.0, delta: 0.004}",
             "train.save_every=1", "train.keep_last=5"]  # fmt: skip
    run_rl(recipe(tiny_model_dir, out, *extra))
    state = json.loads((out / "checkpoints" / "step-2" / "trainer_state.json").read_text())
    assert state["entropy_coef"] == pytest.approx(0.002)
    run_rl(recipe(tiny_model_dir, out, *extra, "train.max_steps=3"))
    steps = metrics(out)
    assert [r["entropy_coef"] for r in steps] == pytest.approx([0.01, 0.006, 0.002])  # step 3: restored
    assert all(r["pg/entropy"] > 1.0 for r in steps)
