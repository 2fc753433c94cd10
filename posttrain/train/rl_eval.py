"""Held-out evaluation of an RL run: greedy task-suite accuracy and an optional eval recipe.

On several processes rank 0 evaluates (the DDP weights are replicated) and every rank receives
its results (`evaluate_on_main`), so every rank's anomaly guard decides alike.
"""

from __future__ import annotations

import json
from typing import Any

from posttrain.distributed.parallel import broadcast, is_main
from posttrain.monitor.logger import console


def evaluate_on_main(evaluate, results: dict, step: int) -> None:
    """``evaluate(step)`` on rank 0 (it fills ``results[step]``), then ``results[step]`` on every rank."""
    if is_main():
        evaluate(step)
    results[step] = broadcast(results[step] if is_main() else None)


def make_evaluator(s: Any, results: dict):
    """evaluate(step): greedy held-out accuracy per task and level, logged under eval/."""
    from posttrain.eval.accuracy import task_accuracy

    def evaluate(step: int) -> None:
        report, records = task_accuracy(s.model, s.run.tokenizer, s.problems, s.cfg.eval.max_new_tokens)
        metrics = {f"task_accuracy/{k}": v for k, v in report.to_dict().items() if k != "seconds"}
        s.run.logger.log(step, metrics, prefix="eval/")
        results[step] = metrics
        with open(s.run.dir / "eval_generations.jsonl", "a") as f:
            f.writelines(json.dumps({"step": step, **r}) + "\n" for r in records[:20])
        console.print(f"eval @ step {step}: held-out accuracy {metrics['task_accuracy/overall']:.3f}")

    return evaluate


def build_evaluator(s: Any, results: dict):
    """evaluate(step): the task-suite accuracy (if any problems) then the eval recipe (if any); None if neither.

    The recipe is loaded and its data checked here, before the first step."""
    task = make_evaluator(s, results) if s.problems else None
    if s.cfg.eval.recipe is None:
        return task
    from posttrain.eval.hook import EvalHookConfig, with_recipe_eval

    hook = EvalHookConfig(s.cfg.eval.recipe, list(s.cfg.eval.recipe_overrides))
    both = with_recipe_eval(hook, s.run, None if task is None else lambda model, step: task(step))
    return lambda step: both(s.model, step)
