"""Preference optimisation (DPO, KTO) on 2 CPU processes (gloo) against 1 process at the same global batch.

Each global micro-batch of 3 examples is split 2 + 1 over the ranks (re-collated per rank);
the last micro-batch of an epoch may leave rank 1 a zero-weight stand-in. KTO's reference
point z0 is the mean over the whole micro-batch, all-reduced. Measured tolerances are in
LOSS_TOL / WEIGHT_TOL's comment; the differences are fp32 summation order and the re-packed
rows (a different row width), nothing else.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from dist_cli import run_posttrain
from safetensors.torch import load_file

from posttrain.data.render import Sample
from posttrain.distributed.launch import DISTRIBUTED_COMMANDS
from posttrain.train.preference import metric_totals, shard_examples, summarise
from posttrain.train.preference_data import Example, ExamplePlan

# Measured (fp32, tiny Qwen2, 5 steps; loss and eval margins/accuracy): DPO max |dloss| 4.8e-07,
# max |dweight| 9.3e-07; KTO 1.3e-06 / 1.4e-06; DPO under FSDP 1.1e-06 / 9.3e-07. (optim.eps 1e-6:
# Adam's normalised step turns fp32 noise on near-zero gradients into ~1e-5 weight differences at 1e-8.)
LOSS_TOL = 1e-5
WEIGHT_TOL = 1e-5


def _recipe(tmp: Path, model_dir: Path) -> Path:
    p = tmp / "preference.yaml"
    p.write_text(
        f"""
model: {{path: {model_dir}}}
data: {{tasks: [sort], levels: [1], n_per_level: 13, eval_n_per_level: 3, malformed: 0.5}}
eval: {{task_accuracy_n: 0}}
optim: {{lr: 2.0e-3, warmup_steps: 1, eps: 1.0e-6}}
train: {{max_steps: 5, batch_size: 3, grad_accum: 2, tensorboard: false, precision: fp32, eval_every: 5}}
"""
    )
    return p


def preference(recipe: Path, out: Path, *overrides: str, **fault):
    return run_posttrain("preference", recipe, out, *overrides, **fault)


def metrics(run: Path) -> dict[tuple[str, int], float]:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    keys = ("loss", "eval/rewards/accuracy", "eval/rewards/margins")
    return {(k, r["step"]): r[k] for r in rows for k in keys if k in r}


def max_diffs(a: Path, b: Path) -> tuple[float, float]:
    ma, mb = metrics(a), metrics(b)
    assert ma.keys() == mb.keys() and ma
    wa, wb = load_file(a / "final" / "model.safetensors"), load_file(b / "final" / "model.safetensors")
    assert wa.keys() == wb.keys()
    loss_diff = max(abs(ma[k] - mb[k]) for k in ma)
    weight_diff = max(float((wa[k] - wb[k]).abs().max()) for k in wa)
    print(f"{b.name}: max |loss diff| {loss_diff:.2e}, max |weight diff| {weight_diff:.2e}")
    return loss_diff, weight_diff


@pytest.mark.slow
@pytest.mark.parametrize("loss,strategy", [("sigmoid", "ddp"), ("kto", "ddp"), ("sigmoid", "fsdp")])
def test_ddp_preference_equals_one_process(tmp_path, tiny_model_dir, loss, strategy):
    recipe = _recipe(tmp_path, tiny_model_dir)
    for name, extra in [("one", ()), ("ddp", ("distributed.nproc=2", f"distributed.strategy={strategy}"))]:
        res = preference(recipe, tmp_path / name, f"loss.name={loss}", *extra)
        assert res.returncode == 0, res.stderr[-3000:]
    loss_diff, weight_diff = max_diffs(tmp_path / "one", tmp_path / "ddp")
    assert loss_diff < LOSS_TOL and weight_diff < WEIGHT_TOL
    before = load_file(tiny_model_dir / "model.safetensors")
    after = load_file(tmp_path / "ddp" / "final" / "model.safetensors")
    assert any(not torch.equal(before[k], after[k]) for k in after if k in before)  # it trained
    rows = (tmp_path / "ddp" / "metrics.jsonl").read_text().splitlines()
    assert sum('"loss"' in r for r in rows) == 5  # rank 0 alone wrote the metrics
    assert (tmp_path / "ddp" / "reference" / "train.pt").is_file()  # rank 0 scored pi_ref once
    if loss == "kto":  # z0 is the whole micro-batch's (all-reduced), not each rank's own
        z = [[json.loads(r).get("kl/reference_point") for r in (tmp_path / n / "metrics.jsonl").open()]
             for n in ("one", "ddp")]  # fmt: skip
        assert all(a is None or abs(a - b) <= 1e-5 * max(1.0, abs(a)) for a, b in zip(*z, strict=True))


@pytest.mark.slow
def test_ddp_preference_resumes_bit_exact_after_sigkill_and_at_one_process(tmp_path, tiny_model_dir):
    """Rank 1 killed after step 3 (checkpoint at step 2): the same command resumes bit-exact; the
    same kill resumed by one process ends within the equivalence tolerance of the 2-rank run."""
    recipe, ddp = _recipe(tmp_path, tiny_model_dir), ("distributed.nproc=2", "train.save_every=2")
    res = preference(recipe, tmp_path / "ddp", *ddp)
    assert res.returncode == 0, res.stderr[-3000:]
    for name, resume in [("killed", ddp), ("to_one", ddp[1:])]:
        res = preference(recipe, tmp_path / name, *ddp, fault="after-step:3", fault_rank=1)
        assert res.returncode != 0 and "rank 1 exited with signal SIGKILL" in res.stderr
        assert [p.name for p in sorted((tmp_path / name / "checkpoints").iterdir())] == ["step-2"]
        res = preference(recipe, tmp_path / name, *resume)
        assert res.returncode == 0, res.stderr[-3000:]
    a, b = (load_file(tmp_path / n / "final" / "model.safetensors") for n in ("ddp", "killed"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    loss_diff, weight_diff = max_diffs(tmp_path / "ddp", tmp_path / "to_one")
    assert loss_diff < LOSS_TOL and weight_diff < WEIGHT_TOL


def test_preference_is_a_distributed_command():
    assert "preference" in DISTRIBUTED_COMMANDS


def _example(i: int) -> Example:
    prompt = [1, 2, 3 + i]
    chosen, rejected = prompt + [10 + i, 11], prompt + [20 + i]
    mask = [-100] * 3
    return Example((Sample(chosen, mask + chosen[3:]), Sample(rejected, mask + rejected[3:])), f"ex{i}")


def test_shard_examples_splits_each_global_batch_and_stands_in_for_an_empty_share():
    plan = ExamplePlan([_example(i) for i in range(4)], range(4), 3, 64, True, True, 0, 0, shuffle=False)
    full, last = plan.epoch(0)  # 3 examples, then 1
    shares = [shard_examples(plan, full, r, 2) for r in range(2)]
    assert [s["example_index"].tolist() for s, _ in shares] == [[0, 1], [2]]
    assert all(real for _, real in shares)
    assert shares[1][0]["sample_pieces"].shape == (2, 2)  # chosen + rejected of its one example
    assert torch.equal(shares[1][0]["input_ids"], plan.collate([2])["input_ids"])
    share, real = shard_examples(plan, last, 1, 2)
    assert not real and share["example_index"].tolist() == [3]  # zero-weight stand-in


def test_step_metrics_summed_over_ranks_equal_one_process():
    t = torch.tensor
    a = (2, {"rewards/chosen": t([1.0, 2.0]), "rewards/rejected": t([0.0, 3.0]), "kl": t(0.5)})
    b = (1, {"rewards/chosen": t([4.0]), "rewards/rejected": t([1.0]), "kl": t(2.0)})
    stand_in = (0, {"rewards/chosen": t([9.0]), "rewards/rejected": t([9.0]), "kl": t(9.0)})
    one = summarise([a, b])
    assert one["kl"] == pytest.approx((2 * 0.5 + 2.0) / 3) and one["rewards/accuracy"] == pytest.approx(2 / 3)
    assert one["rewards/margins"] == pytest.approx((1 - 1 + 3) / 3)
    rank1 = [x for pair in metric_totals([b, stand_in]).values() for x in pair]
    two = summarise([a], reduce=lambda flat: [x + y for x, y in zip(flat, rank1, strict=True)])
    assert two == pytest.approx(one)
