"""Held-out evaluation inside training: a trainer's ``eval`` section may name an eval recipe.

`recipe_evaluator` turns an eval recipe (`posttrain.eval.runner.EvalRecipe`: the user's own
datasets, decodings and k) into ``evaluate(model, tokenizer, step) -> metrics``: the model in
training is wrapped in the HF rollout engine (no copy, no reload), `run_eval` writes
``RUN_DIR/eval/step_<step>/results.json`` and ``report.md``, and the returned flat metrics
(``<decoding>/<metric>``, plus ``.../ci_low`` and ``.../ci_high``) are ready for the run's
logger under ``eval/``. The recipe's ``model`` section is ignored (the trainer's model is used)
except ``model.prompt``: ``plain`` for the raw-question format, else the chat template.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

from posttrain.eval.runner import Decoder, EvalRecipe, run_eval

Evaluator = Callable[[Any, Any, int], dict[str, float]]


def flat_metrics(results: dict[str, Any]) -> dict[str, float]:
    """``{"<label>/<metric>": value, "<label>/<metric>/ci_low": ..., ...}`` of a results.json."""
    out: dict[str, float] = {}
    for label, metrics in results["metrics"].items():
        for name, m in metrics.items():
            if m.get("value") is None:
                continue
            out[f"{label}/{name}"] = m["value"]
            out[f"{label}/{name}/ci_low"] = m["ci_low"]
            out[f"{label}/{name}/ci_high"] = m["ci_high"]
    return out


def recipe_evaluator(
    recipe: str | Path | EvalRecipe, run_dir: str | Path, overrides: Sequence[str] = ()
) -> Evaluator:
    """``evaluate(model, tokenizer, step)`` over the recipe's data (module docstring). The recipe
    is loaded and its data checked now, so a bad path or scorer fails before training starts."""
    import json

    from posttrain.config import load_recipe
    from posttrain.eval.data import load_items

    base = recipe if isinstance(recipe, EvalRecipe) else load_recipe(EvalRecipe, recipe, list(overrides))
    base.validate()
    for src in base.data:
        load_items(replace(src, limit=1))

    def evaluate(model: Any, tokenizer: Any, step: int) -> dict[str, float]:
        from posttrain.rollout.engine import get_engine

        was_training = model.training
        model.eval()
        try:
            engine = get_engine(
                "hf", model=model, tokenizer=tokenizer, max_batch_rows=base.model.max_batch_rows
            )
            chat = tokenizer if base.model.prompt != "plain" else None
            out = str(Path(run_dir) / "eval" / f"step_{step:06d}")
            path = run_eval(replace(base, output_dir=out), Decoder(engine, chat, None))
        finally:
            model.train(was_training)
        return flat_metrics(json.loads(path.read_text()))

    return evaluate
