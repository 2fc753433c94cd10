"""Search exports train: one optimiser step each of SFT, PRM and preference on files written by the exporters."""

from __future__ import annotations

import json
import math

from search_env import write_mcts_exports

from posttrain.config import load_recipe
from posttrain.train.preference import PreferenceRecipe, run_preference
from posttrain.train.prm import PRMRecipe, run_prm
from posttrain.train.sft import SFTRecipe, run_sft


def _losses(run_dir) -> list[float]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in rows if "loss" in r]


def test_each_export_trains_one_step(env, tiny_model_dir, tmp_path):
    files = write_mcts_exports(env, tmp_path)
    common = [
        f"model.path={tiny_model_dir}",
        "train.max_steps=1",
        "train.batch_size=2",
        "train.tensorboard=false",
    ]
    runs = {
        "sft": (SFTRecipe, run_sft, ["data.eval=null", "train.seq_len=128", "train.num_samples=0"]),
        "prm": (PRMRecipe, run_prm, ["data.eval=null", "eval_before=false"]),
        "pref": (PreferenceRecipe, run_preference, ["data.eval=null", "eval.before=false"]),
    }
    for name, (recipe, run, extra) in runs.items():
        out = tmp_path / f"run-{name}"
        cfg = load_recipe(recipe, None, [*common, *extra, f"data.train={files[name]}", f"output_dir={out}"])
        final = run(cfg)
        losses = _losses(out)
        assert len(losses) == 1 and math.isfinite(losses[0]) and losses[0] > 0, (name, losses)
        assert final.is_dir(), name
