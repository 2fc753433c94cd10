"""Judge checklist of data clean, through the OpenAI-compatible endpoint path with a rule judge.

The judge behind the endpoint is deterministic code that grades additions: it reads the
check's rubric, the request and the response out of the judge prompt and answers PASS/FAIL
the way a careful judge would (the HTTP client, the server, the prompt and the verdict parser
are the real ones).
"""

from __future__ import annotations

import json
import re

import pytest
from quality_helpers import make_item, read_jsonl

from posttrain.config import from_dict
from posttrain.data.quality.clean import CleanRecipe, run_clean
from posttrain.data.quality.judge import CHECKS, JudgeChecklistConfig, check_prompts, verdicts_of
from posttrain.errors import ConfigError
from posttrain.eval.judge_backends import serve_openai

_SUM = re.compile(r"(\d+) \+ (\d+)")
_EQ = re.compile(r"(\d+) \+ (\d+) = (\d+)")


def addition_judge(chats: list[list[dict]]) -> list[str]:
    """Grade each judge prompt: label_noise (final number == a + b), off_topic (the response is
    about the sum), fake_reasoning (every ``a + b = c`` step holds and ends on the answer)."""
    out = []
    for chat in chats:
        text = chat[-1]["content"]
        request = text.split("Request:\n", 1)[1].split("\n\nResponse:\n", 1)[0]
        response = text.split("\n\nResponse:\n", 1)[1].rsplit("\n\nGive one sentence", 1)[0]
        if "undecidable" in request:
            out.append("I cannot tell.")
            continue
        a, b = map(int, _SUM.search(request).groups())
        numbers = re.findall(r"\d+", response)
        if CHECKS["label_noise"] in text:
            ok = bool(numbers) and int(numbers[-1]) == a + b
        elif CHECKS["off_topic"] in text:
            ok = bool(numbers)
        else:
            steps = _EQ.findall(response)
            ok = bool(steps) and all(int(x) + int(y) == int(z) for x, y, z in steps)
            ok = ok and steps[-1][2] == numbers[-1]
        out.append(f"Checked the sum.\nVerdict: {'PASS' if ok else 'FAIL'}")
    return out


def qa(question: str, answer: str, reasoning: str | None = None) -> dict:
    reply = {"role": "assistant", "content": answer}
    if reasoning:
        reply["reasoning_content"] = reasoning
    return {"messages": [{"role": "user", "content": question}, reply]}


ROWS = [
    qa("What is 2 + 3?", "The answer is 5.", "2 + 3 = 5"),  # 1 clean
    qa("What is 4 + 4?", "The answer is 9."),  # 2 label noise (no reasoning: not asked fake_reasoning)
    qa("What is 1 + 6?", "The capital of France is Paris."),  # 3 off topic (and no right answer)
    qa("What is 5 + 5?", "The answer is 10.", "5 + 5 = 12"),  # 4 right answer, wrong chain
    qa("What is 3 + 3? (undecidable)", "6"),  # 5 the judge gives no verdict: unparsable, no flag
]


@pytest.fixture
def endpoint():
    server, url = serve_openai(addition_judge)
    yield url
    server.shutdown()


def _run(tmp_path, jsonl, url, remove):
    path = jsonl("in.jsonl", ROWS)
    raw = {"inputs": [path], "output_dir": str(tmp_path / f"out-{remove}"), "dedup": {"near": False},
           "judge": {"endpoint": url, "remove": remove, "batch_size": 2, "concurrency": 2}}  # fmt: skip
    return path, run_clean(from_dict(CleanRecipe, raw))


def test_flags_are_reported_and_records_kept_by_default(tmp_path, jsonl, endpoint):
    path, out = _run(tmp_path, jsonl, endpoint, remove=False)
    report = json.loads((out / "report.json").read_text())
    assert report["kept"] == 5 and report["removed"]["judge"] == 0
    flags = {r["where"]: r for r in read_jsonl(out / "flags.jsonl")}
    assert {w: r["flags"] for w, r in flags.items()} == {
        f"{path}:2": ["label_noise"],
        f"{path}:3": ["label_noise", "off_topic"],
        f"{path}:4": ["fake_reasoning"],
    }
    assert flags[f"{path}:2"]["verdicts"] == {"label_noise": "FAIL", "off_topic": "PASS"}
    assert flags[f"{path}:4"]["record"] == ROWS[3]


def test_remove_drops_flagged_records_with_the_verdicts(tmp_path, jsonl, endpoint):
    path, out = _run(tmp_path, jsonl, endpoint, remove=True)
    report = json.loads((out / "report.json").read_text())
    assert report["kept"] == 2 and report["removed"]["judge"] == 3
    assert read_jsonl(out / "kept.jsonl") == [ROWS[0], ROWS[4]]
    removed = read_jsonl(out / "removed.jsonl")
    assert [r["where"] for r in removed] == [f"{path}:{i}" for i in (2, 3, 4)]
    assert removed[2]["evidence"]["verdicts"] == {
        "label_noise": "PASS",
        "off_topic": "PASS",
        "fake_reasoning": "FAIL",
    }
    assert (out / "flags.jsonl").read_text() == ""


def test_prompts_and_verdicts_by_hand():
    item = make_item(qa("What is 2 + 3?", "<think>2 + 3 = 5</think> 5"))
    names = [n for n, _ in check_prompts(item, list(CHECKS), 4000)]
    assert names == ["label_noise", "off_topic", "fake_reasoning"]  # a <think> block counts as reasoning
    plain = make_item(qa("What is 2 + 3?", "5"))
    assert [n for n, _ in check_prompts(plain, list(CHECKS), 4000)] == ["label_noise", "off_topic"]
    found = verdicts_of({"label_noise": "Verdict: PASS", "off_topic": "verdict: fail", "fake_reasoning": "?"})
    assert found["flags"] == ["off_topic"]
    assert found["verdicts"] == {"label_noise": "PASS", "off_topic": "FAIL", "fake_reasoning": "unparsable"}
    with pytest.raises(ConfigError, match="unknown judge check"):
        JudgeChecklistConfig(endpoint="http://x", checks=["tone"]).validate()


@pytest.mark.slow
def test_shipped_model_checks_recipe_runs_on_the_default_model(tmp_path):
    from pathlib import Path

    from posttrain.data.quality.clean import clean_main

    recipe = Path(__file__).parents[3] / "recipes" / "clean_model_checks.yaml"
    out = clean_main(
        str(recipe),
        [
            f"output_dir={tmp_path / 'out'}",
            "inputs=[{path: task:arith, n_per_level: 3}]",
            "judge.max_new_tokens=8",
        ],
    )
    report = json.loads((out / "report.json").read_text())
    assert report["input"] == 12 and report["kept"] + sum(report["removed"].values()) == 12
    assert (
        report["removed"]["perplexity"] == 1
    )  # the top 5% of 11-12 scored records: one above the percentile
    flagged = read_jsonl(out / "flags.jsonl")
    assert all(r["flags"] and set(r["verdicts"]) <= set(CHECKS) for r in flagged)
