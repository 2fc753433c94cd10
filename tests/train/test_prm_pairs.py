"""The within-question pairwise loss (`prm` pair_weight) makes a PRM rank a question's chains."""

from __future__ import annotations

import json
import re

import torch
from reward_env import small_recipe

from posttrain.data.loaders import write_jsonl
from posttrain.data.tasks import task_problems
from posttrain.train.prm import PRMRecipe, collate_questions, run_prm, step_plan
from posttrain.train.rm_data import StepSample


def _bump(step: str) -> str:
    """The step with its result one higher (flips its parity)."""
    head, result = step.rsplit("=", 1)
    return f"{head}= {int(result) + 1}"


def _records(split: str, n: int) -> list[dict]:
    """Two chains per arith question, the original and one with every result + 1: a step is
    "right" iff its result is even, so the chains of a question have opposite labels at every
    step. Level-3 questions carry a wrong-heavy bias (the chain with more odd results is written
    three times): a scorer can lower its error by learning the level, not the rule."""
    rows = []
    for p in task_problems(["arith"], split, n, 0, [1, 3]):
        for steps in (list(p.steps), [_bump(s) for s in p.steps]):
            labels = [float(int(re.split("=", s)[-1]) % 2 == 0) for s in steps]
            copies = 3 if p.level == 3 and sum(labels) < len(labels) / 2 else 1
            rows += [{"prompt": p.question, "completions": steps, "labels": labels}] * copies
    return rows


def test_collate_questions_groups_steps_by_question_and_index():
    a = StepSample([5, 6, 7, 8], [-1, 1.0, -1, 0.0], "a", "q1")
    b = StepSample([5, 6, 9], [-1, 0.0, 1.0], "b", "q1")
    c = StepSample([4, 6], [-1, 1.0], "c", "q2")
    batch = collate_questions([[a, b], [c]], pad_id=0)
    assert batch["pair_group"].tolist() == [[-1, 0, -1, 1], [-1, 0, 1, -1], [-1, 1024, -1, -1]]
    assert torch.equal(batch["step_labels"][:, :3], torch.tensor([[-1, 1, -1], [-1, 0, 1], [-1, 1, -1.0]]))


def test_grouped_plan_keeps_each_question_in_one_batch_of_about_batch_size_chains():
    chains = [
        StepSample([1] * (3 + i % 5), [-1.0] * (2 + i % 5) + [1.0], f"c{i}", f"q{i // 4}") for i in range(40)
    ]
    plan = step_plan(chains, batch_size=8, pad_id=0, seed=0, grouped=True)
    batches = plan.epoch(0)
    assert len(batches) == 5 and all(b["input_ids"].shape[0] == 8 for b in batches)  # 2 questions x 4
    groups = torch.cat([b["pair_group"][b["pair_group"] >= 0] for b in batches])
    assert groups.numel() == 40 and sorted(set(groups.tolist())) == [0, 1024]
    flat = step_plan(chains, batch_size=8, pad_id=0, seed=0, grouped=False).epoch(0)
    assert "pair_group" not in flat[0] and sum(b["input_ids"].shape[0] for b in flat) == 40


def _run(tmp_path, tiny_model_dir, name: str, pair_weight: float) -> dict:
    out = tmp_path / name
    data = [f"data.train={tmp_path / 'train.jsonl'}", f"data.eval={tmp_path / 'test.jsonl'}"]
    keys = ["train.max_steps=12", "train.batch_size=16", "optim.lr=1e-2", f"pair_weight={pair_weight}"]
    run_prm(small_recipe(PRMRecipe, tiny_model_dir, out, *data, *keys))
    metrics = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines() if x.strip()]
    return json.loads((out / "eval.json").read_text()) | {"log": metrics}


def test_pair_weight_moves_same_question_pair_accuracy(tmp_path, tiny_model_dir):
    write_jsonl(tmp_path / "train.jsonl", _records("train", 24))
    write_jsonl(tmp_path / "test.jsonl", _records("test", 8))
    bce = _run(tmp_path, tiny_model_dir, "bce", 0.0)
    pair = _run(tmp_path, tiny_model_dir, "pair", 1.0)
    assert bce["before"]["pairs"] == pair["before"]["pairs"] > 0  # held-out pairs counted alike
    # measured: BCE only 0.60 -> 0.69, BCE + pairs 0.60 -> 0.79 (12 steps)
    assert pair["after"]["pair_acc"] > 0.75 and pair["after"]["pair_acc"] > bce["after"]["pair_acc"] + 0.05
    assert any("pair_loss" in m for m in pair["log"]) and not any("pair_loss" in m for m in bce["log"])
