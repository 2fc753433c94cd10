"""Distillation options chosen in the issue-12 experiments: Hinton's T^2 factor and GKD's mixed data
(a share of steps on the student's samples, the rest on the demonstrations)."""

from __future__ import annotations

import json

import pytest
import torch

from posttrain.errors import ConfigError
from posttrain.train.distill import DistillRecipe, run_distill
from posttrain.train.distill.config import DistillLossConfig, DistillRolloutConfig
from posttrain.train.distill.on_policy import OnPolicyPlan
from posttrain.train.loop import LoopConfig, ModelConfig
from posttrain.train.optim import OptimConfig


def _batch():
    from posttrain.data.collate import pad_collate
    from posttrain.data.render import Sample

    return pad_collate([Sample([5, 6, 7, 8], [-100, 6, 7, 8]), Sample([9, 10, 11], [-100, -100, 11])], 0)


def test_tau_squared_scales_the_divergence_by_t2(tiny_model_dir, student_dir):
    """Same batch, T = 2: the loss with tau_squared is exactly 4x the plain one, and the plain
    one equals the loss function's own token mean (a loop over the 4 trained positions)."""
    from posttrain.algos.distill_losses import token_divergence
    from posttrain.models.load import load_model
    from posttrain.train.distill.logit import make_step
    from posttrain.train.distill.teacher import labelled_logits

    teacher = load_model(str(tiny_model_dir)).float()
    student = load_model(str(student_dir)).float()
    vocab, loop, cpu = teacher.config.vocab_size, LoopConfig(precision="fp32"), torch.device("cpu")
    plain = make_step(teacher, DistillLossConfig(temperature=2.0), vocab)(student, [_batch()], loop, cpu)
    student.zero_grad()
    scaled = make_step(teacher, DistillLossConfig(temperature=2.0, tau_squared=True), vocab)(
        student, [_batch()], loop, cpu
    )
    assert scaled["loss"] == pytest.approx(4.0 * plain["loss"], rel=1e-5)
    with torch.no_grad():
        s, t = labelled_logits(student, _batch(), vocab), labelled_logits(teacher, _batch(), vocab)
    rows = [float(token_divergence(s[i], t[i], temperature=2.0)) for i in range(s.shape[0])]
    assert s.shape[0] == 4 and plain["loss"] == pytest.approx(sum(rows) / 4, rel=1e-5) and plain["loss"] > 0


def _recipe(teacher, student, out, fraction: float, seed: int, steps: int = 4) -> DistillRecipe:
    cfg = DistillRecipe(
        mode="on_policy",
        teacher=ModelConfig(path=str(teacher)),
        student=ModelConfig(path=str(student)),
        loss=DistillLossConfig(kind="reverse_kl"),
        optim=OptimConfig(lr=3e-3, warmup_steps=0, schedule="constant"),
        train=LoopConfig(max_steps=steps, batch_size=4, seq_len=128, tensorboard=False, num_samples=0),
        rollout=DistillRolloutConfig(prompts_per_step=2, n=1, max_new_tokens=8, student_fraction=fraction),
        output_dir=str(out),
        seed=seed,
    )
    cfg.data.tasks, cfg.data.levels, cfg.data.n_per_level = ["arith"], [1], 16
    cfg.data.eval, cfg.data.max_len = None, 128
    return cfg


def _coins(seed: int, fraction: float, n: int) -> list[bool]:
    plan = OnPolicyPlan.__new__(OnPolicyPlan)  # the coin reads only seed and rollout
    plan.seed, plan.ro = seed, DistillRolloutConfig(student_fraction=fraction)
    return [plan.from_student(0, i) for i in range(n)]


def test_gkd_coin_share_and_limits():
    coins = [c for seed in range(5) for c in _coins(seed, 0.3, 400)]
    assert 0.27 < sum(coins) / len(coins) < 0.33
    assert all(_coins(0, 1.0, 50)) and not any(_coins(0, 0.0, 50))
    assert _coins(3, 0.5, 50) == _coins(3, 0.5, 50) != _coins(4, 0.5, 50)


def test_mixed_run_samples_on_the_coin_steps_and_trains_on_demos_otherwise(
    tiny_model_dir, student_dir, tmp_path
):
    """Steps whose coin says "student" log sampled completion tokens; the others train on the
    demonstrations' batch (the same batch logit KD reads: equal tokens)."""
    from posttrain.data.sft_data import build_samples
    from posttrain.models.load import load_tokenizer
    from posttrain.train.distill.logit import SamplePlan, step_totals

    seed = next(s for s in range(50) if 0 < sum(_coins(s, 0.5, 4)) < 4)
    cfg = _recipe(tiny_model_dir, student_dir, tmp_path / "mix", 0.5, seed)
    run_distill(cfg)
    rows = [json.loads(x) for x in (tmp_path / "mix" / "metrics.jsonl").read_text().splitlines()]
    rows = [r for r in rows if "loss" in r]
    assert [r.get("completion_tokens", 0) > 0 for r in rows] == _coins(seed, 0.5, 4)
    tok = load_tokenizer(str(student_dir))
    demos = SamplePlan(build_samples(tok, cfg.data, "train")[0], 2, tok.pad_token_id, seed).epoch(0)
    for i, (r, student) in enumerate(zip(rows, _coins(seed, 0.5, 4), strict=True)):
        if not student:
            assert r["tokens"] == step_totals([demos[i]])[0]
            assert torch.isfinite(torch.tensor(r["loss"])) and r["loss"] > 0


def test_student_fraction_outside_unit_interval_is_a_config_error(tiny_model_dir, tmp_path):
    with pytest.raises(ConfigError, match="student_fraction"):
        _recipe(tiny_model_dir, tiny_model_dir, tmp_path, 1.5, 0).validate()
