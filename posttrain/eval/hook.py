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
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

Evaluator = Callable[[Any, Any, int], dict[str, float]]


@dataclass
class EvalHookConfig:
    """A trainer's held-out evaluation on the user's data: an eval recipe run every eval step."""

    recipe: str | None = None
    """An eval recipe (`posttrain eval` YAML: datasets, decodings, k, perplexity sets); its metrics
    are logged under ``eval/`` every ``train.eval_every`` steps and at the end, and written to
    ``RUN_DIR/eval/step_<step>/``. None: off."""
    recipe_overrides: list[str] = field(default_factory=list)
    """``key=value`` overrides applied to that recipe (e.g. ``limit=50``)."""


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
    recipe: str | Path | Any, run_dir: str | Path, overrides: Sequence[str] = ()
) -> Evaluator:
    """``evaluate(model, tokenizer, step)`` over the recipe's data (module docstring). The recipe
    is loaded and its data checked now, so a bad path or scorer fails before training starts."""
    import json

    from posttrain.config import load_recipe
    from posttrain.eval.data import load_items
    from posttrain.eval.runner import Decoder, EvalRecipe, run_eval

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


def with_recipe_eval(
    cfg: EvalHookConfig, run: Any, evaluate: Callable[[Any, int], Any] | None
) -> Callable[[Any, int], None] | None:
    """A trainer's ``evaluate(model, step)`` followed by the eval recipe of ``cfg`` (if any), whose
    metrics go to ``run.logger`` under ``eval/`` and are printed. ``evaluate`` is returned as it
    is when ``cfg.recipe`` is None; the recipe is checked now (before training)."""
    if cfg.recipe is None:
        return evaluate
    held = recipe_evaluator(cfg.recipe, run.dir, cfg.recipe_overrides)

    def both(model: Any, step: int) -> None:
        if evaluate is not None:
            evaluate(model, step)
        metrics = held(model, run.tokenizer, step)
        run.logger.log(step, metrics, prefix="eval/")
        shown = {k: v for k, v in metrics.items() if "/ci_" not in k}
        print(f"eval recipe @ step {step}: " + ", ".join(f"{k} {v:.3f}" for k, v in list(shown.items())[:6]))

    return both
