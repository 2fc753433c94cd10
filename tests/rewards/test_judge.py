"""The AI judge: verdict parsing, prompt plumbing with a stub generator, rubric use, a real tiny model."""

from __future__ import annotations

import pytest

from posttrain.errors import DataError
from posttrain.rewards.judge import DEFAULT_CONSTITUTION, Judge, hf_generate, parse_score, prompt_text
from posttrain.rewards.registry import get_reward
from posttrain.rewards.rubric import Criterion, Rubric


@pytest.mark.parametrize(
    ("text", "score", "how"),
    [
        ("The answer is right.\nScore: 8", 8, "after"),
        ("**Score:** 7/10", 7, "after"),
        ("score = 9", 9, "after"),
        ('I must end with "Score: N". Two steps are fine.\nScore: 6', 6, "after"),
        ("Score: 3 at first; on reflection Score: 5", 5, "after"),
        ("I would give it 4 out of 10.", 4, "first"),
        ("Score: 7.5", 7.5, "after"),
    ],
)
def test_parse_score_reads_the_verdict(text, score, how):
    value, info = parse_score(text)
    assert value == score and info["why"].startswith(how) and "clamped" not in info


def test_parse_score_clamps_and_gives_up():
    assert parse_score("Score: 42") == (10, {"why": "after 'Score': 42", "raw": 10, "clamped": True})
    assert parse_score("Score: 0")[0] == 1
    assert parse_score("no idea, sorry") == (None, {"why": "unparseable"})


def test_judge_prompts_and_rewards_with_a_stub_generator():
    seen = []

    def generate(chats):
        seen.extend(chats)
        return ["Looks right. Score: 10", "Wrong sum.\nScore: 1", "hmm"]

    judge = Judge(generate)
    prompts = [[{"role": "user", "content": "Compute 2 + 2"}], "Compute 3 + 3", "Sort 3 1"]
    out = judge(prompts, ["Answer: 4", "Answer: 7", "Answer: 1 3"], [{}] * 3)
    assert [r.score for r in out] == [1.0, 0.0, 0.0]
    assert (
        out[0].info["raw"] == 10
        and out[2].why == "unparseable"
        and out[1].info["verdict"].startswith("Wrong")
    )
    text = seen[1][0]["content"]
    assert seen[1][0]["role"] == "user" and DEFAULT_CONSTITUTION in text
    assert "Compute 3 + 3" in text and "Answer: 7" in text and "Score: N" in text
    with pytest.raises(DataError, match="3 texts for 2"):
        judge(prompts[:2], ["a", "b"])


def test_prompt_text_of_chats():
    assert prompt_text([{"role": "user", "content": "hi"}]) == "hi"
    chat = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}]
    assert prompt_text(chat) == "system: be brief\nuser: hi"


def test_judge_plugs_into_a_weighted_rubric():
    def generate(chats):  # rates by the criterion in the prompt: 7 for "correct", 3 otherwise
        return ["Score: 7" if "is it correct" in c[0]["content"] else "Score: 3" for c in chats]

    judge = Judge(generate)
    rubric = Rubric(
        [
            Criterion("correct", weight=2.0, question="is it correct"),
            Criterion("polite", weight=1.0, question="is it polite"),
            Criterion("has_answer", weight=1.0, pattern=r"Answer:"),
        ],
        aggregate="mean",
        judge=judge.ask,
    )
    (res,) = rubric.score(["Compute 1 + 1"], ["Answer: 2"], [{}])
    correct, polite = (7 - 1) / 9, (3 - 1) / 9
    assert res.info["parts"] == pytest.approx({"correct": correct, "polite": polite, "has_answer": 1.0})
    assert res.score == pytest.approx((2 * correct + polite + 1.0) / 4)


def test_registered_judge_runs_a_real_local_model(tiny_model_dir):
    """Plumbing with a real (untrained, so random) model: any output parses to a score in [0, 1]."""
    out = get_reward("judge")(
        ["Compute 1 + 1", "Sort 2 1"],
        ["Answer: 2", "Answer: 1 2"],
        [{"judge_model": str(tiny_model_dir)}] * 2,
    )
    assert len(out) == 2 and all(0.0 <= r.score <= 1.0 and "verdict" in r.info for r in out)
    gen = hf_generate(str(tiny_model_dir), max_new_tokens=4)
    assert all(isinstance(t, str) for t in gen([[{"role": "user", "content": "hi"}]]))
    with pytest.raises(DataError, match="judge_model"):
        get_reward("judge")(["x"], ["y"], [{}])
