"""The RL update on 2 CPU processes (gloo) against 1 process: rank 0 samples (the same rollouts
as the one-process run: same seed, same weights), every rank trains its rows of each mini-batch.

6 rows per step (3 prompts x 2), 2 mini-batches of 3 rows split 2 + 1 over the ranks, 2 micro
parts per rank (rank 1's second part is a zero-weight stand-in), 2 PPO epochs, KL in the loss
against a frozen reference, an entropy bonus (a gradient on every step). Measured tolerances are in LOSS_TOL / WEIGHT_TOL's comment.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from dist_cli import run_posttrain
from safetensors.torch import load_file

from posttrain.distributed.config import DistributedConfig
from posttrain.errors import ConfigError
from posttrain.train.rl_dist import check_rl_processes

# Measured (fp32, tiny Qwen2, 3 RL steps = 12 optimiser steps, lr 1e-3): max |dloss| 1.5e-07
# (loss/minibatch, kl, grad_norm), max |dweight| 3.6e-07; rewards identical (rank 0 samples).
LOSS_TOL = 1e-5
WEIGHT_TOL = 1e-5


def _recipe(tmp: Path, model_dir: Path) -> Path:
    p = tmp / "rl.yaml"
    p.write_text(
        f"""
model: {{path: {model_dir}}}
data: {{tasks: [arith], levels: [1], n_per_level: 12}}
rewards: [{{name: scorer}}, {{name: overlong}}]
rollout: {{prompts_per_step: 3, n: 2, max_new_tokens: 24, overlong_buffer: 22}}
algorithm: {{mini_batches: 2, micro_batches: 2, ppo_epochs: 2, entropy_coef: 0.01, kl: {{coef: 0.05}}}}
optim: {{lr: 1.0e-3, eps: 1.0e-6}}
eval: {{n_per_level: 2, max_new_tokens: 8}}
train: {{max_steps: 3, tensorboard: false, precision: fp32, save_every: 2}}
"""
    )
    return p


def rl(recipe: Path, out: Path, *overrides: str):
    return run_posttrain("rl", recipe, out, *overrides)


def rows(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_ddp_rl_update_equals_one_process(tmp_path, tiny_model_dir):
    recipe = _recipe(tmp_path, tiny_model_dir)
    for name, extra in [("one", ()), ("ddp", ("distributed.nproc=2",))]:
        res = rl(recipe, tmp_path / name, *extra)
        assert res.returncode == 0, res.stderr[-3000:]
    a, b = rows(tmp_path / "one"), rows(tmp_path / "ddp")
    assert [r["step"] for r in a] == [r["step"] for r in b] == [0, 1, 2, 3, 3]  # rank 0 alone wrote
    train = [(x, y) for x, y in zip(a, b, strict=True) if "loss/minibatch" in x]
    assert len(train) == 3
    for x, y in train:  # the same rollouts: rank 0 sampled them exactly as one process did
        assert x["reward/total_mean"] == y["reward/total_mean"]
    keys = ("loss/minibatch", "kl/rollout_seq_mean", "grad_norm")  # not the per-part means (other parts)
    loss_diff = max(abs(x[k] - y[k]) for x, y in train for k in keys)
    wa = load_file(tmp_path / "one" / "final" / "model.safetensors")
    wb = load_file(tmp_path / "ddp" / "final" / "model.safetensors")
    weight_diff = max(float((wa[k] - wb[k]).abs().max()) for k in wa)
    print(f"rl ddp: max |loss diff| {loss_diff:.2e}, max |weight diff| {weight_diff:.2e}")
    assert loss_diff < LOSS_TOL and weight_diff < WEIGHT_TOL
    start = load_file(tiny_model_dir / "model.safetensors")
    assert any(not torch.equal(start[k], wb[k]) for k in wb if k in start)  # it trained
    ckpts = sorted(p.name for p in (tmp_path / "ddp" / "checkpoints").iterdir())
    assert ckpts == ["step-2", "step-3"]


@pytest.mark.parametrize(
    "strategy,backend,multi_turn,key",
    [("fsdp", "hf", False, "distributed.strategy"), ("ddp", "ray", False, "rollout.backend"),
     ("ddp", "hf", True, "distributed.nproc")],
)  # fmt: skip
def test_unsupported_distributed_rl_is_a_clear_error(strategy, backend, multi_turn, key):
    cfg = DistributedConfig(nproc=2, strategy=strategy)
    with pytest.raises(ConfigError) as exc:
        check_rl_processes(cfg, backend, multi_turn)
    assert key in str(exc.value)
    check_rl_processes(
        DistributedConfig(nproc=1, strategy=strategy), backend, multi_turn
    )  # one process: fine


def test_planner_does_not_suggest_fsdp_for_the_ddp_only_rl_update():
    from posttrain.distributed.plan import PlanConfig, _alternatives
    from posttrain.train.rl import RLRecipe
    from posttrain.train.sft import SFTRecipe

    def texts(recipe, command):
        return [text for text, _ in _alternatives(recipe, command, PlanConfig(), "ddp", 2)]

    assert "distributed.strategy=fsdp" not in texts(RLRecipe(), "rl")
    assert "distributed.strategy=fsdp" in texts(SFTRecipe(), "sft")
