"""The built-in reward functions (`BUILTINS`), added to the registry on its first lookup.

Metadata each one reads (a missing field is a `DataError` naming the row):

- ``math``: ``ground_truth`` (a ``\\boxed{}`` in it is unwrapped); the completion's answer
  is `extract_math_answer`'d and compared by math-verify (`math_equal_batch`). 1 or 0.
- ``task``: ``task`` (else the row's ``scorer``) and ``ground_truth``: the task suite's verify. 1 or 0.
- ``format``: nothing; `check_format`. 1 or 0.
- ``overlong``: ``completion_tokens``, ``max_tokens`` and optionally ``overlong_buffer``
  (default max_tokens // 4): DAPO's `overlong_penalty`, in [-1, 0].
- ``code``: ``tests`` (and optionally ``public_tests``, same form, run too),
  ``entry_point``, ``timeout_s``, ``mem_mb``; the last fenced code block of the completion
  runs in the sandbox. 1 if every test passes, else 0. ``code_partial``: passed / total.
- ``rm`` / ``prm``: ``reward_model`` (a folder from `posttrain rm` / `posttrain prm`), for
  ``prm`` optionally ``prm_agg`` (min | last | mean | product); see `posttrain.rewards.models`.
- ``judge``: ``judge_model`` (any model folder) and optionally ``constitution``; see
  `posttrain.rewards.judge`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from posttrain.errors import DataError
from posttrain.rewards.registry import RewardFn, RewardResult
from posttrain.rewards.verifiers import (
    check_format,
    extract_boxed,
    extract_code,
    extract_math_answer,
    overlong_penalty,
    verify_task,
)

if TYPE_CHECKING:
    from posttrain.rewards.sandbox import SandboxConfig


def _require(meta: dict, key: str, i: int, kinds: type | tuple[type, ...] = str) -> Any:
    value = meta.get(key)
    if value is None or not isinstance(value, kinds) or isinstance(value, bool):
        raise DataError(f"reward needs metadata {key!r} ({kinds})", where=f"metadata[{i}].{key}")
    return value


def math_reward(prompts: list, completions: list[str], metadata: list[dict]) -> list[RewardResult]:
    """1.0 when the extracted answer is equivalent to ``ground_truth`` (math-verify), else 0.0."""
    from posttrain.rewards.math_verify import math_equal_batch

    golds = []
    for i, meta in enumerate(metadata):
        gold = str(_require(meta, "ground_truth", i, (str, int, float)))
        golds.append(extract_boxed(gold) or gold)
    preds = [extract_math_answer(c) for c in completions]
    verdicts = math_equal_batch(golds, preds)
    return [
        RewardResult(float(ok), {"why": why, "answer": p})
        for (ok, why), p in zip(verdicts, preds, strict=True)
    ]


def task_reward(prompts: list, completions: list[str], metadata: list[dict]) -> list[RewardResult]:
    """1.0 when the task suite's verifier accepts the completion, else 0.0."""
    out = []
    for i, (completion, meta) in enumerate(zip(completions, metadata, strict=True)):
        task = meta.get("task") or _require(meta, "scorer", i)
        gold = str(_require(meta, "ground_truth", i, (str, int)))
        ok = verify_task(completion, task, gold)
        out.append(RewardResult(float(ok), {"why": f"{task}: {'correct' if ok else 'wrong'}"}))
    return out


def format_reward(prompts: list, completions: list[str], metadata: list[dict]) -> list[RewardResult]:
    """`check_format`: 1.0 for ``<think>...</think>`` then one ``Answer:`` line, else 0.0."""
    return [RewardResult(score, {"why": why}) for score, why in map(check_format, completions)]


def overlong_reward(prompts: list, completions: list[str], metadata: list[dict]) -> list[RewardResult]:
    """DAPO's soft overlong penalty from ``completion_tokens`` and ``max_tokens``."""
    out = []
    for i, meta in enumerate(metadata):
        length = _require(meta, "completion_tokens", i, int)
        max_tokens = _require(meta, "max_tokens", i, int)
        buffer = meta.get("overlong_buffer", max_tokens // 4)
        score = overlong_penalty(length, max_tokens, buffer)
        out.append(RewardResult(score, {"why": f"{length} tokens of {max_tokens} (buffer {buffer})"}))
    return out


def _merge_tests(meta: dict, i: int) -> Any:
    """``public_tests`` then ``tests`` (both lists, or both strings)."""
    tests, public = meta.get("tests"), meta.get("public_tests")
    if tests is None:
        raise DataError("code reward needs metadata 'tests'", where=f"metadata[{i}].tests")
    if public is None:
        return tests
    if isinstance(public, list) and isinstance(tests, list):
        return public + tests
    if isinstance(public, str) and isinstance(tests, str):
        return public + "\n" + tests
    raise DataError("public_tests and tests must have the same form", where=f"metadata[{i}].public_tests")


def make_code_reward(config: SandboxConfig | None = None, partial: bool = False) -> RewardFn:
    """A code reward running in the sandbox with ``config`` (a `SandboxConfig`; default limits).

    Score: 1.0 only if every test passes (``partial``: the fraction passed). A completion
    without code scores 0 without running.
    """

    def code_reward(prompts: list, completions: list[str], metadata: list[dict]) -> list[RewardResult]:
        from posttrain.rewards.sandbox import Program, run_programs

        rows, programs = [], []
        for i, (completion, meta) in enumerate(zip(completions, metadata, strict=True)):
            code = extract_code(completion)
            tests = _merge_tests(meta, i)
            if code.strip():
                rows.append(i)
                programs.append(
                    Program(code, tests, meta.get("entry_point"), meta.get("timeout_s"), meta.get("mem_mb"))
                )
        out = [RewardResult(0.0, {"why": "no code", "reason": "syntax_error"})] * len(completions)
        for i, res in zip(rows, run_programs(programs, config), strict=True):
            full = res.passed == res.total and res.reason == "ok"
            score = res.passed / res.total if partial else float(full)
            why = f"{res.reason}: {res.passed}/{res.total} passed" + (
                f" ({res.detail})" if res.detail else ""
            )
            out[i] = RewardResult(
                score, {"why": why, "reason": res.reason, "passed": res.passed, "total": res.total}
            )
        return out

    return code_reward


def _model_reward(module: str, name: str) -> RewardFn:
    """A model-based reward (`posttrain.rewards.models` / `.judge`), imported on its first call."""

    def model_reward(prompts: list, completions: list[str], metadata: list[dict]) -> list[RewardResult]:
        import importlib

        return getattr(importlib.import_module(module), name)(prompts, completions, metadata)

    model_reward.__doc__ = f"`{module}.{name}` (loads the model named in the row's metadata)."
    return model_reward


BUILTINS: dict[str, RewardFn] = {
    "math": math_reward,
    "task": task_reward,
    "format": format_reward,
    "overlong": overlong_reward,
    "code": make_code_reward(),
    "code_partial": make_code_reward(partial=True),
    "rm": _model_reward("posttrain.rewards.models", "rm_reward"),
    "prm": _model_reward("posttrain.rewards.models", "prm_reward"),
    "judge": _model_reward("posttrain.rewards.judge", "judge_reward"),
}
