"""`eval.recipe` in SFT and preference recipes: the user's held-out metrics at every eval step."""

from __future__ import annotations

import json

from posttrain.config import load_recipe

ROWS = [
    {"id": "s1", "prompt": "Sort ascending: 3 1 2", "metadata": {"scorer": "math", "ground_truth": "1 2 3"}},
    {"id": "s2", "prompt": "Sort ascending: 9 4", "metadata": {"scorer": "math", "ground_truth": "4 9"}},
]


def eval_recipe(tmp_path) -> str:
    data = tmp_path / "held.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    path = tmp_path / "held_eval.yaml"
    path.write_text(
        f"data:\n  - path: {data}\ndecodings:\n  - max_new_tokens: 8\n"
        "perplexity:\n  - path: tasks\n    tasks: [sort]\n    n_per_level: 1\n"
    )
    return str(path)


def eval_rows(out) -> list[dict]:
    rows = [json.loads(ln) for ln in (out / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if "eval/greedy/accuracy" in r]


def test_sft_logs_recipe_metrics_every_eval_step(tmp_path, tiny_model_dir):
    from posttrain.train.sft import SFTRecipe, run_sft

    out = tmp_path / "sft"
    cfg = load_recipe(SFTRecipe, None, [
        f"model.path={tiny_model_dir}", f"output_dir={out}", "data.tasks=[sort]", "data.levels=[1]", "data.n_per_level=32",
        "data.eval_n_per_level=2", "train.max_steps=12", "train.batch_size=4", "train.seq_len=128",
        "train.eval_every=6", "train.num_samples=0", "train.tensorboard=false", "optim.lr=3e-3", f"eval.recipe={eval_recipe(tmp_path)}",
    ])  # fmt: skip
    run_sft(cfg)
    rows = eval_rows(out)
    assert [r["step"] for r in rows] == [6, 12]
    for r in rows:
        assert r["eval/greedy/response_length"] <= 8
        assert (
            r["eval/greedy/accuracy/ci_low"] <= r["eval/greedy/accuracy"] <= r["eval/greedy/accuracy/ci_high"]
        )
    ppl = [r["eval/perplexity/tasks/perplexity"] for r in rows]
    assert ppl[1] < ppl[0]  # SFT on sort chains of thought lowers their held-out perplexity
    assert (out / "eval" / "step_000012" / "results.json").is_file()
    results = json.loads((out / "eval" / "step_000006" / "results.json").read_text())
    assert [p["id"] for p in results["problems"]] == ["s1", "s2"]


def test_preference_logs_recipe_metrics_before_and_after(tmp_path, tiny_model_dir):
    from posttrain.train.preference import PreferenceRecipe, run_preference

    out = tmp_path / "dpo"
    cfg = load_recipe(PreferenceRecipe, None, [
        f"model.path={tiny_model_dir}", f"output_dir={out}", "data.tasks=[sort]", "data.levels=[1]",
        "data.n_per_level=16", "data.eval_n_per_level=4", "eval.task_accuracy_n=0", "train.batch_size=4",
        "train.max_steps=3", "train.tensorboard=false", f"eval.recipe={eval_recipe(tmp_path)}",
        "eval.recipe_overrides=[limit=1]",
    ])  # fmt: skip
    run_preference(cfg)
    rows = eval_rows(out)
    assert [r["step"] for r in rows] == [0, 3]  # eval.before, then the end
    results = json.loads((out / "eval" / "step_000003" / "results.json").read_text())
    assert [p["id"] for p in results["problems"]] == ["s1"]  # the override limit=1 applied
    assert rows[0]["eval/perplexity/tasks/perplexity"] != rows[1]["eval/perplexity/tasks/perplexity"]
