"""A PRM learns a step rule it can only read at the step ends, and reports train vs held-out fit."""

from __future__ import annotations

import json

import pytest
from reward_env import small_recipe

from posttrain.data.loaders import write_jsonl
from posttrain.data.tasks import task_problems
from posttrain.train.prm import PRMRecipe, run_prm, spaced


def _parity_records(split: str, n: int) -> list[dict]:
    """arith chains labelled by hand: a step is "right" iff its result is even. The rule is read
    from the digit just before each step end, so a PRM scoring the wrong token cannot learn it."""
    rows = []
    for p in task_problems(["arith"], split, n, 0, [1, 2, 3]):
        labels = [float(int(s.rsplit("=", 1)[1]) % 2 == 0) for s in p.steps]
        rows.append({"prompt": p.question, "completions": list(p.steps), "labels": labels})
    return rows


def test_prm_on_hand_made_labels_moves_held_out_auc_above_0_8(tmp_path, tiny_model_dir):
    write_jsonl(tmp_path / "train.jsonl", _parity_records("train", 48))
    write_jsonl(tmp_path / "test.jsonl", _parity_records("test", 16))
    out = tmp_path / "prm"
    data = [f"data.train={tmp_path / 'train.jsonl'}", f"data.eval={tmp_path / 'test.jsonl'}"]
    keys = ["train.max_steps=30", "train.batch_size=16", "optim.lr=1e-2"]  # 3e-3: 0.61 -> 0.66 in 40 steps
    run_prm(small_recipe(PRMRecipe, tiny_model_dir, out, *data, *keys))
    report = json.loads((out / "eval.json").read_text())
    before, after = report["before"], report["after"]
    assert before["step_auc"] < 0.7 and after["step_auc"] > 0.85, report  # 0.61 -> 1.0
    assert (
        after["train_step_auc"] > before["train_step_auc"] + 0.2
        and after["train_loss"] < before["train_loss"]
    )


def test_train_fit_is_the_held_out_metric_on_the_same_chains(tmp_path, tiny_model_dir):
    assert spaced(list(range(10)), 4) == [0, 2, 5, 7] and spaced([1, 2], 5) == [1, 2] and spaced([1], 0) == []
    write_jsonl(tmp_path / "train.jsonl", _parity_records("train", 8))
    data = [f"data.train={tmp_path / 'train.jsonl'}", f"data.eval={tmp_path / 'train.jsonl'}"]
    run_prm(small_recipe(PRMRecipe, tiny_model_dir, tmp_path / "prm", *data, "eval_train_chains=1000"))
    after = json.loads((tmp_path / "prm" / "eval.json").read_text())["after"]
    assert after["train_step_auc"] == pytest.approx(after["step_auc"])
    assert after["train_loss"] == pytest.approx(after["loss"], rel=1e-5)
