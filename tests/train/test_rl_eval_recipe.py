"""`eval.recipe` in an RL recipe: the user's held-out metrics logged at every eval step."""

from __future__ import annotations

import json

from posttrain.config import load_recipe
from posttrain.rewards.registry import register_reward
from posttrain.train.rl import RLRecipe, run_rl

ROWS = [
    {"id": "q1", "prompt": "Compute 2 + 3", "metadata": {"scorer": "math", "ground_truth": "5"}},
    {"id": "q2", "prompt": "Compute 4 + 4", "metadata": {"scorer": "math", "ground_truth": "8"}},
    {"id": "q3", "prompt": "Compute 1 + 6", "metadata": {"scorer": "math", "ground_truth": "7"}},
]


@register_reward("rl_eval_digits", replace=True)
def digit_share(prompts, completions, metadata):
    return [sum(ch.isdigit() for ch in c) / max(len(c), 1) for c in completions]


def test_rl_logs_the_eval_recipe_beside_the_task_accuracy(tmp_path, tiny_model_dir):
    data = tmp_path / "held.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    recipe_path = tmp_path / "held_eval.yaml"
    recipe_path.write_text(f"data:\n  - path: {data}\ndecodings:\n  - max_new_tokens: 6\n")
    out = tmp_path / "rl"
    cfg = load_recipe(RLRecipe, None, [
        f"model.path={tiny_model_dir}", f"output_dir={out}", "data.tasks=[arith]", "data.levels=[1]",
        "data.n_per_level=8", "rewards=[{name: rl_eval_digits}]", "rollout.prompts_per_step=2", "rollout.n=2",
        "rollout.max_new_tokens=6", "eval.n_per_level=2", "eval.max_new_tokens=6", "optim.lr=1e-2",
        "train.max_steps=2", "train.eval_every=1", "train.tensorboard=false", f"eval.recipe={recipe_path}",
    ])  # fmt: skip
    run_rl(cfg)
    rows = [json.loads(ln) for ln in (out / "metrics.jsonl").read_text().splitlines()]
    held = [r for r in rows if "eval/greedy/accuracy" in r]
    task = [r for r in rows if "eval/task_accuracy/overall" in r]
    assert [r["step"] for r in held] == [0, 1, 2] == [r["step"] for r in task]
    for r in held:
        assert 0 <= r["eval/greedy/accuracy"] <= 1 and r["eval/greedy/response_length"] <= 6
    results = json.loads((out / "eval" / "step_000002" / "results.json").read_text())
    assert [p["id"] for p in results["problems"]] == ["q1", "q2", "q3"]
