"""Evaluation: ``posttrain eval`` on any datasets (`runner.run_eval`, `runner.EvalRecipe`), the
metrics as pure functions (`metrics`: pass@k, maj@k, bootstrap intervals), the sources
(`data`, `humaneval`), results.json / report.md (`results`), perplexity masked like SFT
(`perplexity`), LLM judges with position swap (`judge`; local or OpenAI-compatible backends and
a local server in `judge_backends`), human rating sheets and Cohen's kappa (`human`), the
lm-evaluation-harness adapter (`harness`), held-out evaluation inside a trainer
(`hook.recipe_evaluator`, ``eval.recipe`` in SFT / preference recipes), and the task-suite greedy
accuracy of the quickstart (`accuracy`). Nothing is imported here, so ``import posttrain.eval``
stays cheap."""
