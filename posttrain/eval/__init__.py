"""Evaluation: ``posttrain eval`` on any datasets (`runner.run_eval`, `runner.EvalRecipe`), the
metrics as pure functions (`metrics`: pass@k, maj@k, bootstrap intervals), the sources
(`data`, `humaneval`), results.json / report.md (`results`), held-out evaluation inside a
trainer (`hook.recipe_evaluator`), and the task-suite greedy accuracy of the quickstart
(`accuracy`). Nothing is imported here, so ``import posttrain.eval`` stays cheap."""
