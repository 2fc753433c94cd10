"""What the reward-model and PRM trainer tests share: a small sort-task recipe."""

from __future__ import annotations

from posttrain.config import load_recipe


def small_recipe(recipe_cls, model_dir, out, *overrides: str):
    """`recipe_cls` on sort levels 1-2 (16 train / 4 eval problems per level), 4 steps of batch 4."""
    base = [
        f"model.path={model_dir}",
        f"output_dir={out}",
        "data.tasks=[sort]",
        "data.levels=[1, 2]",
        "data.n_per_level=16",
        "data.eval_n_per_level=4",
        "train.max_steps=4",
        "train.batch_size=4",
        "train.tensorboard=false",
        "optim.lr=3e-3",
    ]
    return load_recipe(recipe_cls, None, [*base, *overrides])
