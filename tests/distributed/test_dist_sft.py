"""SFT on 2 CPU processes (gloo) against 1 process at the same global batch.

Measured on this machine (fp32, the tiny Qwen2 of conftest, 6 steps, 2 micro-batches of 3
packed rows per step, split 2 + 1 rows over the ranks): DDP and FSDP losses differ from the
one-process run by < 1e-6 and the final weights by < 1e-6 (max abs); the tests allow
LOSS_TOL / WEIGHT_TOL. The differences are fp32 summation order (per-rank partial gradients
added by the all-reduce), nothing else.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from dist_cli import run_posttrain
from safetensors.torch import load_file

LOSS_TOL = 1e-5
WEIGHT_TOL = 1e-5
pytestmark = pytest.mark.slow


def _recipe(tmp: Path, model_dir: Path) -> Path:
    p = tmp / "sft.yaml"
    p.write_text(
        f"""
model: {{path: {model_dir}}}
data: {{train: tasks, eval: tasks, tasks: [arith], n_per_level: 8, eval_n_per_level: 2, max_len: 128}}
optim: {{lr: 1.0e-3, warmup_steps: 2}}
train: {{max_steps: 6, batch_size: 3, grad_accum: 2, seq_len: 128, save_every: 2, keep_last: 5,
        tensorboard: false, precision: fp32, eval_every: 3, num_samples: 1, sample_max_new_tokens: 4}}
"""
    )
    return p


def sft(recipe: Path, out: Path, *overrides: str, **fault):
    return run_posttrain("sft", recipe, out, *overrides, **fault)


def losses(run: Path) -> dict[tuple[str, int], float]:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return {(k, r["step"]): r[k] for r in rows for k in ("loss", "eval/loss") if k in r}


def weights(run: Path) -> dict[str, torch.Tensor]:
    return load_file(run / "final" / "model.safetensors")


def max_diffs(a: Path, b: Path) -> tuple[float, float]:
    la, lb = losses(a), losses(b)
    assert la.keys() == lb.keys()
    wa, wb = weights(a), weights(b)
    assert wa.keys() == wb.keys()
    loss_diff = max(abs(la[k] - lb[k]) for k in la)
    weight_diff = max(float((wa[k] - wb[k]).abs().max()) for k in wa)
    print(f"{b.name}: max |loss diff| {loss_diff:.2e}, max |weight diff| {weight_diff:.2e}")
    return loss_diff, weight_diff


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_model_dir):
    tmp = tmp_path_factory.mktemp("dist")
    recipe = _recipe(tmp, tiny_model_dir)
    out = {}
    for name, extra in [("one", ()), ("ddp", ("distributed.nproc=2",))]:
        res = sft(recipe, tmp / name, *extra)
        assert res.returncode == 0, res.stderr[-3000:]
        out[name] = tmp / name
    return recipe, tmp, out


def test_ddp_equals_one_process_at_the_same_global_batch(runs):
    _, _, out = runs
    loss_diff, weight_diff = max_diffs(out["one"], out["ddp"])
    assert loss_diff < LOSS_TOL and weight_diff < WEIGHT_TOL
    assert len(losses(out["ddp"])) == 6 + 2  # rank 0 alone wrote metrics (6 steps, 2 evals)
    assert len((out["ddp"] / "samples.jsonl").read_text().splitlines()) == 2


def test_fsdp_equals_one_process_and_saves_sharded(runs):
    recipe, tmp, out = runs
    res = sft(recipe, tmp / "fsdp", "distributed.nproc=2", "distributed.strategy=fsdp")
    assert res.returncode == 0, res.stderr[-3000:]
    loss_diff, weight_diff = max_diffs(out["one"], tmp / "fsdp")
    assert loss_diff < LOSS_TOL and weight_diff < WEIGHT_TOL
    ckpt = tmp / "fsdp" / "checkpoints" / "step-6"
    assert {"__0_0.distcp", "__1_0.distcp", ".metadata", "COMPLETE"} <= {p.name for p in ckpt.iterdir()}
    assert not list((tmp / "fsdp" / "checkpoints").glob("*.tmp-*"))


def test_ddp_resume_after_sigkill_of_one_rank_is_bit_exact(runs):
    recipe, tmp, out = runs
    run = tmp / "ddp_killed"
    res = sft(recipe, run, "distributed.nproc=2", fault="after-step:3", fault_rank=1)
    assert res.returncode != 0
    assert "rank 1 exited with signal SIGKILL" in res.stderr
    assert [p.name for p in sorted((run / "checkpoints").iterdir())] == ["step-2"]
    res = sft(recipe, run, "distributed.nproc=2")
    assert res.returncode == 0, res.stderr[-3000:]
    a, b = weights(out["ddp"]), weights(run)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_world_size_change_fsdp_2_to_1_and_1_to_fsdp_2(runs):
    recipe, tmp, out = runs
    down = tmp / "fsdp_to_one"
    res = sft(recipe, down, "distributed.nproc=2", "distributed.strategy=fsdp", fault="after-step:3")
    assert res.returncode != 0 and (down / "checkpoints" / "step-2" / ".metadata").is_file()
    res = sft(recipe, down, "distributed.strategy=fsdp")  # one process reads the 2-rank shards
    assert res.returncode == 0, res.stderr[-3000:]
    assert "changed settings" not in res.stdout + res.stderr  # a new world size is the same run
    up = tmp / "one_to_fsdp"
    res = sft(recipe, up, fault="after-step:3")
    assert res.returncode != 0 and (up / "checkpoints" / "step-2" / "trainable.safetensors").is_file()
    res = sft(recipe, up, "distributed.nproc=2", "distributed.strategy=fsdp")
    assert res.returncode == 0, res.stderr[-3000:]
    for run in (down, up):
        loss_diff, weight_diff = max_diffs(out["one"], run)
        assert loss_diff < LOSS_TOL and weight_diff < WEIGHT_TOL


def test_a_stuck_rank_ends_the_job_with_its_number(runs):
    recipe, tmp, _ = runs
    res = sft(recipe, tmp / "hang", "distributed.nproc=2", "distributed.timeout_minutes=0.05",
              fault="hang-after-step:1", fault_rank=1)  # fmt: skip
    assert res.returncode == 2
    assert "rank 1 stopped answering" in res.stderr
    assert "sft on 2 processes failed" in res.stderr


def test_prm_ddp_equals_one_process(tmp_path, tiny_model_dir):
    from posttrain.data.loaders import write_jsonl
    from posttrain.data.tasks.prm_data import prm_records, task_problems

    write_jsonl(
        tmp_path / "prm.jsonl", prm_records(task_problems(["sort"], "train", 6, levels=[2, 3]), 1, seed=0)
    )
    recipe = tmp_path / "prm.yaml"
    recipe.write_text(
        f"""
model: {{path: {tiny_model_dir}}}
data: {{train: {tmp_path / "prm.jsonl"}, eval: null}}
optim: {{lr: 3.0e-3}}
train: {{max_steps: 4, batch_size: 5, grad_accum: 2, tensorboard: false, precision: fp32}}
"""
    )
    _reward_model_ddp_equals_one_process(tmp_path, "prm", recipe)


def test_rm_ddp_equals_one_process(tmp_path, tiny_model_dir):
    """Groups (with all their responses) are split over the ranks. optim.eps=1e-3: the head's bias
    gets an exactly-zero Bradley-Terry gradient, whose fp noise Adam (eps 1e-8) would turn into
    +-lr updates that differ between any two summation orders."""
    recipe = tmp_path / "rm.yaml"
    recipe.write_text(
        f"""
model: {{path: {tiny_model_dir}}}
data: {{tasks: [sort], levels: [1, 2], n_per_level: 16, eval_n_per_level: 4}}
optim: {{lr: 3.0e-3, eps: 1.0e-3}}
train: {{max_steps: 4, batch_size: 5, grad_accum: 2, tensorboard: false, precision: fp32}}
"""
    )
    _reward_model_ddp_equals_one_process(tmp_path, "rm", recipe)


def test_pretrain_ddp_equals_one_process_and_is_reused(tmp_path):
    recipe = tmp_path / "pre.yaml"
    recipe.write_text(
        """
model: {vocab_size: 300, hidden_size: 32, num_layers: 2, num_heads: 2, num_kv_heads: 1, intermediate_size: 64}
corpus: {n_docs: 300}
train: {max_steps: 4, batch_size: 3, seq_len: 128, tensorboard: false}
"""
    )
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    for name, extra in [("one", []), ("ddp", ["distributed.nproc=2"]), ("ddp", ["distributed.nproc=2"])]:
        cmd = [
            sys.executable,
            "-m",
            "posttrain",
            "pretrain",
            str(recipe),
            f"output_dir={tmp_path / name}",
            *extra,
        ]
        res = subprocess.run(cmd, env=env, capture_output=True, text=True)
        assert res.returncode == 0, res.stderr[-3000:]
    assert (
        "reusing pretrained model" in res.stdout + res.stderr
    )  # the second 2-process run found the first one's
    loss_diff, weight_diff = max_diffs(tmp_path / "one", tmp_path / "ddp")
    assert loss_diff < LOSS_TOL and weight_diff < WEIGHT_TOL


def _reward_model_ddp_equals_one_process(tmp_path, command: str, recipe) -> None:
    """`posttrain COMMAND RECIPE` on 1 process and with distributed.nproc=2: the same losses and
    final weights (backbone and reward head) within the stated tolerances."""
    runs = []
    for name, extra in [("one", []), ("ddp", ["distributed.nproc=2"])]:
        cmd = [
            sys.executable,
            "-m",
            "posttrain",
            command,
            str(recipe),
            f"output_dir={tmp_path / name}",
            *extra,
        ]
        res = subprocess.run(cmd, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True)
        assert res.returncode == 0, res.stderr[-3000:]
        runs.append(tmp_path / name)
    la, lb = losses(runs[0]), losses(runs[1])
    assert la.keys() == lb.keys() and max(abs(la[k] - lb[k]) for k in la) < LOSS_TOL
    for f in ("model.safetensors", "reward_head.safetensors"):
        wa, wb = load_file(runs[0] / "final" / f), load_file(runs[1] / "final" / f)
        assert max(float((wa[k] - wb[k]).abs().max()) for k in wa) < WEIGHT_TOL
