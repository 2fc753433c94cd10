"""`posttrain prm-label`: MC labels of task chains, the files it writes, and a PRM trained on them."""

from __future__ import annotations

import json
import random

import pytest

from posttrain.data.loaders import load_records, write_jsonl
from posttrain.data.tasks import get_task, task_problems
from posttrain.data.tasks.prm_data import prm_records as synthetic_records
from posttrain.errors import DataError
from posttrain.search.compare import TaskSetConfig
from posttrain.search.mc_labels import MCLabelConfig
from posttrain.search.prm_label import PRMLabelRecipe, run_prm_label
from posttrain.search.scripted import ScriptedPolicy


def _piece(p, steps, i: int, answer: str) -> str:
    end = f"</think>\nAnswer: {answer}" if i == len(steps) - 1 else "<step>"
    return ("<think>" if i == 0 else "") + steps[i] + end


def task_policy(problems, seed: int = 0) -> ScriptedPolicy:
    """Per problem, the policy writes the reference chain, except that at the corrupted chain's
    first wrong step it may write that chain instead (finishing it in one piece)."""
    rng, tree = random.Random(seed), {}
    for p in problems:
        wrong, first = get_task(p.task).corrupt(rng, p)
        prefix = p.question + "\n"
        for i in range(len(p.steps)):
            options = [(_piece(p, p.steps, i, p.answer), -0.1)]
            if i == first:
                rest = [_piece(wrong, wrong.steps, j, wrong.answer) for j in range(i, len(wrong.steps))]
                options.append(("".join(rest), -0.2))
            tree[prefix] = options
            prefix += options[0][0]
    return ScriptedPolicy(tree)


def _recipe(out, **mc) -> PRMLabelRecipe:
    problems = TaskSetConfig(tasks=["sort"], levels=[1, 2], n_per_level=24, split="train")
    return PRMLabelRecipe(problems=problems, mc=MCLabelConfig(n_chains=2, k=2, **mc), output_dir=str(out))


def test_prm_label_writes_exact_labels_and_reuses_a_finished_run(tmp_path):
    recipe = _recipe(tmp_path / "mc", label="soft")
    problems = task_problems(["sort"], "train", 24, levels=[1, 2])
    path = run_prm_label(recipe, task_policy(problems))
    rows = [r.data for r in load_records(str(path), kind="prompt")]
    oracle = [json.loads(x) for x in (tmp_path / "mc" / "oracle.jsonl").read_text().splitlines()]
    assert len(rows) == len(oracle) == 2 * len(problems)
    for k in range(0, len(rows), 2):  # per problem: the reference chain, then the corrupted one
        right, wrong = rows[k], rows[k + 1]
        first = next(i for i, y in enumerate(oracle[k + 1]["labels"]) if y == 0)
        assert wrong["metadata"]["first_error"] == first and right["metadata"]["first_error"] is None
        # before the branch point, 1 of k = 2 rollouts takes the right branch and reaches the answer
        assert right["labels"] == [0.5] * first + [1.0] * (len(right["labels"]) - first)
        assert wrong["labels"] == [0.5] * first + [0.0] * (len(wrong["labels"]) - first)
        assert oracle[k]["labels"] == [1.0] * len(right["labels"])
    stats = json.loads((tmp_path / "mc" / "stats.json").read_text())
    assert stats["agreement"]["hard_label_accuracy"] == 1.0 == stats["agreement"]["first_error_agreement"]
    assert stats["agreement"]["chain_accuracy"] == 0.5
    values = (tmp_path / "mc" / "values.jsonl").read_text().splitlines()
    assert values and all(0.0 <= json.loads(v)["value"] <= 1.0 for v in values)
    again = ScriptedPolicy({})  # a rerun of the finished recipe samples nothing
    assert run_prm_label(recipe, again) == path and again.calls == []
    binary = run_prm_label(_recipe(tmp_path / "bin", search="binary"), task_policy(problems))
    cost = json.loads((tmp_path / "bin" / "stats.json").read_text())["cost"]
    assert cost["rollouts"] < stats["cost"]["rollouts"]
    assert [r.data["metadata"]["first_error"] for r in load_records(str(binary), kind="prompt")] == [
        r["metadata"]["first_error"] for r in rows
    ]


def test_prm_trained_on_mc_labels_moves_step_auc_on_held_out_chains(tmp_path, tiny_model_dir):
    from posttrain.config import load_recipe
    from posttrain.train.prm import PRMRecipe, run_prm

    problems = task_problems(["sort"], "train", 24, levels=[1, 2])
    # hard labels: the soft ones (0.5 before the branch point) need more steps than a unit test has
    path = run_prm_label(_recipe(tmp_path / "mc"), task_policy(problems))  # hard labels, the default
    held_out = synthetic_records(task_problems(["sort"], "test", 8, levels=[1, 2]), n_corrupt=1, seed=1)
    write_jsonl(tmp_path / "held_out.jsonl", held_out)
    out = tmp_path / "prm"
    keys = {"model.path": tiny_model_dir, "output_dir": out, "data.train": path,
            "data.eval": tmp_path / "held_out.jsonl", "train.max_steps": 24, "train.batch_size": 8,
            "train.tensorboard": "false", "optim.lr": 3e-3}  # fmt: skip
    run_prm(load_recipe(PRMRecipe, None, [f"{k}={v}" for k, v in keys.items()]))
    report = json.loads((out / "eval.json").read_text())
    assert report["after"]["step_auc"] > report["before"]["step_auc"] + 0.15, report  # 0.39 -> 0.67


def test_a_policy_that_writes_no_steps_is_a_named_error(tmp_path):
    problems = task_problems(["sort"], "train", 2, levels=[1])
    plain = ScriptedPolicy({p.question + "\n": [("Answer: 1 2 3", -0.1)] for p in problems})
    recipe = _recipe(tmp_path)
    recipe.problems.n_per_level, recipe.problems.levels = 2, [1]
    with pytest.raises(DataError, match="mc.step_sep"):
        run_prm_label(recipe, plain)
