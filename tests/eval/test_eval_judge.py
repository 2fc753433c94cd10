"""LLM-as-judge in eval: robust parsing, both orders, the OpenAI-compatible endpoint, timeouts."""

from __future__ import annotations

import json
import socket
import time

import pytest

from posttrain.errors import BackendUnavailable, ConfigError
from posttrain.eval.data import EvalDataConfig
from posttrain.eval.judge import (
    JudgeConfig,
    combine_orders,
    judge_pairwise,
    pairwise_summary,
    parse_pairwise,
    parse_pointwise,
)
from posttrain.eval.judge_backends import local_generate, openai_generate, serve_openai
from posttrain.eval.runner import DecodingConfig, EvalRecipe, run_eval
from posttrain.search.compare import SearchModelConfig

ROWS = [
    {"id": "q1", "prompt": "What is 2+3?", "metadata": {"scorer": "math", "ground_truth": "5"}},
    {"id": "q2", "prompt": "What is 7*6?", "metadata": {"scorer": "math", "ground_truth": "42"}},
    {"id": "q3", "prompt": "Compute 12 + 7", "metadata": {"scorer": "math", "ground_truth": "19"}},
]


@pytest.mark.parametrize(
    ("text", "scale", "want"),
    [
        ("Clear and right.\nScore: 7", "1-10", 7.0),
        ("**Score**: 8/10", "1-10", 8.0),
        ('Reply "Score: N" ... it is fine. Score: 9', "1-10", 9.0),  # the last marker wins
        ("6", "1-10", 6.0),
        (" 4/10. ", "1-10", 4.0),
        ("Score: 15", "1-10", None),  # outside the scale: unparsable, not clamped
        ("Score: 0", "1-10", None),
        ("I would give it 5 out of ten", "1-10", None),  # no marker, not a bare number
        ("", "1-10", None),
        ("Good.\nVerdict: PASS", "pass_fail", 1.0),
        ("verdict = fail", "pass_fail", 0.0),
        ("FAIL.", "pass_fail", 0.0),
        ("Verdict: maybe", "pass_fail", None),
        ("Score: 9", "pass_fail", None),
    ],
)
def test_parse_pointwise(text, scale, want):
    assert parse_pointwise(text, scale) == want


@pytest.mark.parametrize(
    ("text", "want"),
    [("B is right.\nWinner: A", "A"), ("**Winner**: [B]", "B"), ("winner: TIE", "tie"), ("B", "B"),
     ("Winner: B ... on reflection Winner: A", "A"), ("Both are fine", None), ("Answer: A", None), ("", None)],
)  # fmt: skip
def test_parse_pairwise(text, want):
    assert parse_pairwise(text) == want


def test_combine_orders_and_summary_by_hand():
    assert combine_orders("A", "B") == ("win", True)  # candidate first, then second: both pick it
    assert combine_orders("B", "A") == ("loss", True)
    assert combine_orders("A", "A") == ("tie", False)  # always the first position: inconsistent
    assert combine_orders("tie", "tie") == ("tie", True)
    assert combine_orders("A", "tie") == ("tie", False)
    assert combine_orders(None, "B") == ("unparsable", None)
    s = pairwise_summary([("win", True), ("tie", False), ("loss", True), ("unparsable", None)], n_boot=200)
    assert s["win_rate"]["value"] == pytest.approx(0.5) and s["win_rate"]["n"] == 3
    assert s["position_consistency"]["value"] == pytest.approx(2 / 3)
    assert s["unparsable_rate"]["value"] == pytest.approx(0.25) and s["unparsable_rate"]["n"] == 4
    assert s["wins"]["value"] == s["ties"]["value"] == s["losses"]["value"] == pytest.approx(1 / 3)
    assert 0 <= s["win_rate"]["ci_low"] <= 0.5 <= s["win_rate"]["ci_high"] <= 1


def test_pairwise_judges_both_orders_on_the_tiny_model(tiny_model_dir):
    generate = local_generate(str(tiny_model_dir), max_new_tokens=12)
    seen: list[list[dict]] = []

    def recording(chats):
        seen.extend(chats)
        return generate(chats)

    cfg = JudgeConfig(mode="pairwise", model=str(tiny_model_dir), baseline="b")
    metrics, rows = judge_pairwise(recording, ["Q1?", "Q2?"], ["cand one", "cand two"], ["base one", "base two"],
                                   cfg, n_boot=100)  # fmt: skip
    assert len(seen) == 4
    for i, (x, y) in enumerate([("cand one", "base one"), ("cand two", "base two")]):
        ab, ba = seen[i][0]["content"], seen[2 + i][0]["content"]
        assert ab.index(x) < ab.index(y) and ba.index(y) < ba.index(x)  # swapped positions
        assert ab.index("Response A") < ab.index(x) < ab.index("Response B") < ab.index(y)
    # every row is either parsed into an outcome or counted unparsable, never silently scored
    n_parsed = sum(r["outcome"] != "unparsable" for r in rows)
    assert metrics["win_rate"]["n"] == n_parsed and metrics["unparsable_rate"]["n"] == 2
    assert [r["outcome"] for r in rows] == [
        combine_orders(parse_pairwise(r["verdict_ab"]), parse_pairwise(r["verdict_ba"]))[0] for r in rows
    ]


def test_endpoint_serves_the_tiny_model_and_eval_judges_through_it(tiny_model_dir, tmp_path):
    local = local_generate(str(tiny_model_dir), max_new_tokens=10)
    server, url = serve_openai(local)
    try:
        chats = [[{"role": "user", "content": "Compute 2 + 3"}], [{"role": "user", "content": "Sort: 3 1 2"}]]
        remote = openai_generate(url, max_tokens=10, timeout_s=30, concurrency=2)
        assert remote(chats) == local(chats)  # the endpoint path returns exactly the model's text
        data = tmp_path / "q.jsonl"
        data.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
        recipe = EvalRecipe(
            model=SearchModelConfig(path=str(tiny_model_dir)), data=[EvalDataConfig(path=str(data))],
            decodings=[DecodingConfig(label="greedy", max_new_tokens=6),
                       DecodingConfig(label="sampled", n=1, temperature=1.0, max_new_tokens=6)],
            judge=JudgeConfig(mode="pairwise", endpoint=url, baseline="sampled", max_new_tokens=10),
            output_dir=str(tmp_path / "out"),
        )  # fmt: skip
        res = json.loads(run_eval(recipe).read_text())
    finally:
        server.shutdown()
    m = res["metrics"]["judge/pairwise"]
    assert m["unparsable_rate"]["n"] == 3 and 0 <= m["unparsable_rate"]["value"] <= 1
    rows = [json.loads(ln) for ln in (tmp_path / "out" / "judge.jsonl").read_text().splitlines()]
    assert [r["question"] for r in rows] == [r["prompt"] for r in ROWS]
    greedy = {p["question"]: p["decodings"]["greedy"]["samples"][0]["text"] for p in res["problems"]}
    assert all(r["candidate"] == greedy[r["question"]] and "verdict_ba" in r for r in rows)
    assert "## judge/pairwise" in (tmp_path / "out" / "report.md").read_text()


def test_pointwise_judge_with_a_local_model(tiny_model_dir, tmp_path):
    data = tmp_path / "q.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in ROWS[:2]))
    recipe = EvalRecipe(
        model=SearchModelConfig(path=str(tiny_model_dir)), data=[EvalDataConfig(path=str(data))],
        decodings=[DecodingConfig(max_new_tokens=6)],
        judge=JudgeConfig(mode="pointwise", model=str(tiny_model_dir), scale="pass_fail", max_new_tokens=8),
        output_dir=str(tmp_path / "out"),
    )  # fmt: skip
    res = json.loads(run_eval(recipe).read_text())
    rows = [json.loads(ln) for ln in (tmp_path / "out" / "judge.jsonl").read_text().splitlines()]
    assert [r["score"] for r in rows] == [parse_pointwise(r["verdict"], "pass_fail") for r in rows]
    m = res["metrics"]["judge/pointwise"]
    assert m["unparsable_rate"]["value"] == pytest.approx(sum(r["score"] is None for r in rows) / 2)
    assert m["pass_rate"]["n"] == sum(r["score"] is not None for r in rows)


def test_unreachable_endpoint_fails_clearly_after_its_timeout():
    silent = socket.socket()  # accepts connections (backlog) but never answers
    silent.bind(("127.0.0.1", 0))
    silent.listen(8)
    url = f"http://127.0.0.1:{silent.getsockname()[1]}/v1"
    try:
        t0 = time.perf_counter()
        with pytest.raises(BackendUnavailable, match=r"after 2 tries of 0.3 s") as err:
            openai_generate(url, timeout_s=0.3, retries=1)([[{"role": "user", "content": "hi"}]])
        assert 0.6 <= time.perf_counter() - t0 < 10
        assert err.value.where == url + "/chat/completions" and "Timeout" in err.value.message
    finally:
        silent.close()
    closed = socket.socket()
    closed.bind(("127.0.0.1", 0))
    port = closed.getsockname()[1]
    closed.close()  # nothing listens: connection refused
    with pytest.raises(BackendUnavailable, match="no answer from the judge endpoint"):
        openai_generate(f"http://127.0.0.1:{port}/v1", timeout_s=0.3, retries=0)(
            [[{"role": "user", "content": "x"}]]
        )


def test_judge_config_errors():
    with pytest.raises(ConfigError, match="baseline"):
        EvalRecipe(judge=JudgeConfig(mode="pairwise", model="m")).validate()
    with pytest.raises(ConfigError, match="no model"):
        EvalRecipe(judge=JudgeConfig(mode="pointwise")).validate()
    with pytest.raises(ConfigError, match="no decoding labelled"):
        EvalRecipe(judge=JudgeConfig(mode="pointwise", model="m", candidate="nope")).validate()
