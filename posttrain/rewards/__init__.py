"""Reward sources: a registry of batched reward functions and the verifiers behind them.

- `registry`: `register_reward`, `get_reward`, `score_batch` (per-row dispatch by
  ``metadata["scorer"]``), `combine`; `builtin`: the built-in rewards.
- `verifiers`: answer extraction, format check, DAPO length shaping, task answers.
- `math_verify`: math equivalence by math-verify in worker processes with timeouts.
- `sandbox` (+ `code_tests`): untrusted code against tests in namespaces; `cli`: its CLI.
- `rubric`: weighted criteria (rewards, regexes, judge questions).
- `models`: trained outcome / process reward models as rewards (``rm``, ``prm``).
- `judge`: an LLM judge scoring against a written constitution (RLAIF; ``judge``).

Nothing is imported here: import the module you need.
"""
