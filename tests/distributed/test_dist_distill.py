"""Logit distillation on 2 CPU processes (gloo) against 1 process at the same global batch:
the teacher in memory (it runs on each rank's rows) and the teacher's top-k cache (each rank
takes its rows' cached positions). On-policy and sequence modes refuse several processes.

Each global micro-batch of 3 padded rows is split 2 + 1 over the ranks; train.loss_agg is
seq-mean-token-mean, so the global sequence count matters too. Measured tolerances are in
LOSS_TOL / WEIGHT_TOL's comment (fp32 summation order only).
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
from posttrain.train.distill.config import DistillRecipe
from posttrain.train.distill.logit import shard_rows

# Measured (fp32, tiny Qwen2 teacher -> 1-layer student, 4 steps): in-memory teacher
# max |dloss| 2.0e-07, max |dweight| 8.2e-08; top-k cache max |dloss| 5.1e-07, max |dweight| 1.2e-07.
LOSS_TOL = 1e-5
WEIGHT_TOL = 1e-5


def _recipe(tmp: Path, teacher: Path, student: Path) -> Path:
    p = tmp / "distill.yaml"
    p.write_text(
        f"""
mode: logit
teacher: {{path: {teacher}}}
student: {{path: {student}}}
data: {{tasks: [arith], levels: [1], n_per_level: 10, eval: null, max_len: 128}}
loss: {{kind: jsd, beta: 0.5, nll_weight: 0.1}}
optim: {{lr: 3.0e-3, warmup_steps: 1, eps: 1.0e-6}}
train: {{max_steps: 4, batch_size: 3, grad_accum: 2, seq_len: 128, tensorboard: false, precision: fp32,
        num_samples: 0, loss_agg: seq-mean-token-mean}}
"""
    )
    return p


def distill(recipe: Path, out: Path, *overrides: str):
    return run_posttrain("distill", recipe, out, *overrides)


def max_diffs(a: Path, b: Path) -> tuple[float, float]:
    def losses(run: Path) -> dict[tuple[str, int], float]:
        rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
        keys = ("loss", "distill/jsd", "nll_token_mean")
        return {(k, r["step"]): r[k] for r in rows for k in keys if k in r}

    la, lb = losses(a), losses(b)
    assert la.keys() == lb.keys() and la
    wa, wb = load_file(a / "final" / "model.safetensors"), load_file(b / "final" / "model.safetensors")
    loss_diff = max(abs(la[k] - lb[k]) for k in la)
    weight_diff = max(float((wa[k] - wb[k]).abs().max()) for k in wa)
    print(f"{b.name}: max |loss diff| {loss_diff:.2e}, max |weight diff| {weight_diff:.2e}")
    return loss_diff, weight_diff


@pytest.mark.slow
@pytest.mark.parametrize("topk,strategy", [(0, "ddp"), (8, "ddp"), (0, "fsdp")])
def test_ddp_logit_distill_equals_one_process(tmp_path, tiny_model_dir, student_dir, topk, strategy):
    recipe = _recipe(tmp_path, tiny_model_dir, student_dir)
    for name, extra in [("one", ()), ("ddp", ("distributed.nproc=2", f"distributed.strategy={strategy}"))]:
        res = distill(recipe, tmp_path / name, f"teacher_topk={topk}", *extra)
        assert res.returncode == 0, res.stderr[-3000:]
    loss_diff, weight_diff = max_diffs(tmp_path / "one", tmp_path / "ddp")
    assert loss_diff < LOSS_TOL and weight_diff < WEIGHT_TOL
    before, after = (
        load_file(student_dir / "model.safetensors"),
        load_file(tmp_path / "ddp/final/model.safetensors"),
    )
    assert any(not torch.equal(before[k], after[k]) for k in after)
    assert len((tmp_path / "ddp" / "metrics.jsonl").read_text().splitlines()) == 4  # rank 0 wrote


def test_shard_rows_keeps_each_rows_cached_topk_positions():
    labels = torch.tensor([[-100, 5, 6, -100], [-100, -100, 7, -100], [-100, 1, 2, 3]])
    batch = {"input_ids": labels.clamp(min=0), "labels": labels, "attention_mask": torch.ones_like(labels)}
    n = int((labels[:, 1:] != -100).sum())  # 2 + 1 + 3 trained positions, row-major
    batch["topk_idx"], batch["topk_logp"] = (
        torch.arange(n)[:, None],
        -torch.arange(n, dtype=torch.float)[:, None],
    )
    first, real0 = shard_rows(batch, 0, 2)
    second, real1 = shard_rows(batch, 1, 2)
    assert real0 and real1
    assert first["topk_idx"].flatten().tolist() == [0, 1, 2] and torch.equal(first["labels"], labels[:2])
    assert second["topk_logp"].flatten().tolist() == [-3.0, -4.0, -5.0]
    one_row = {k: v[:1] if k not in ("topk_idx", "topk_logp") else v[:2] for k, v in batch.items()}
    stand_in, real = shard_rows(one_row, 1, 2)
    assert not real and stand_in["topk_idx"].shape == (0, 1) and bool((stand_in["labels"] == -100).all())


@pytest.mark.parametrize("mode", ["on_policy", "sequence"])
def test_on_policy_and_sequence_refuse_several_processes(mode):
    cfg = DistillRecipe(mode=mode, distributed=DistributedConfig(nproc=2))
    with pytest.raises(ConfigError, match="does not run on several processes") as exc:
        cfg.validate()
    assert "distributed.nproc" in str(exc.value)
    DistillRecipe(mode="logit", distributed=DistributedConfig(nproc=2)).validate()
