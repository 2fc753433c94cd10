"""Outcome / process reward models as batched reward functions."""

from __future__ import annotations

import pytest
import torch

from posttrain.data.tasks import make_split
from posttrain.errors import ConfigError, DataError
from posttrain.models.heads import RewardModel, ScalarHead, last_token_values, save_reward_model
from posttrain.models.load import load_model, load_tokenizer
from posttrain.models.peft import PeftConfig
from posttrain.rewards.models import ModelScorer, aggregate_steps
from posttrain.rewards.registry import get_reward, score_batch
from posttrain.train.rm_data import prm_token_ids, step_sample


@pytest.fixture(scope="module")
def saved(tmp_path_factory, tiny_model_dir):
    """An (untrained) outcome RM and process RM saved from the tiny model."""
    tok = load_tokenizer(tiny_model_dir)
    out = {}
    for kind, info in {"orm": {}, "prm": {"step_sep": "<step>", "last_step_end": "</think>"}}.items():
        lm = load_model(tiny_model_dir, dtype="float32", device="cpu")
        model = RewardModel(lm, ScalarHead(64, seed=1))
        folder = tmp_path_factory.mktemp(kind) / "final"
        out[kind] = save_reward_model(model, tok, folder, PeftConfig(), {"kind": kind, **info})
    return out


def _chats():
    problems = make_split("sort", "test", 3, levels=[2, 3])
    return [p.prompt_record()["prompt"] for p in problems], [p.response("<step>") for p in problems], problems


def test_aggregate_steps():
    probs = [0.9, 0.5, 0.8]
    assert aggregate_steps(probs, "min") == 0.5 and aggregate_steps(probs, "last") == 0.8
    assert aggregate_steps(probs, "mean") == pytest.approx(2.2 / 3)
    assert aggregate_steps(probs, "product") == pytest.approx(0.36)
    assert aggregate_steps([], "min") == 0.0
    with pytest.raises(ConfigError, match="min, last, mean, product"):
        aggregate_steps(probs, "max")


def test_prm_scorer_matches_the_training_view_and_is_batch_invariant(saved):
    prompts, completions, problems = _chats()
    batched = ModelScorer(str(saved["prm"]), batch_size=16)(prompts, completions)
    single = ModelScorer(str(saved["prm"]), batch_size=1)(prompts, completions)
    scorer = ModelScorer(str(saved["prm"]))
    seps = prm_token_ids(scorer.tokenizer, "<step>", "</think>")
    for b, s, p, prompt in zip(batched, single, problems, prompts, strict=True):
        assert len(b.info["steps"]) == len(p.steps) and b.score == pytest.approx(min(b.info["steps"]))
        torch.testing.assert_close(
            torch.tensor(b.info["steps"]), torch.tensor(s.info["steps"]), atol=1e-5, rtol=0
        )
        # reference: the chain as the PRM trainer renders it, values at its labelled positions
        ref = step_sample(
            scorer.tokenizer, prompt, list(p.steps), [1.0] * len(p.steps), seps, "ref", p.final()
        )
        with torch.no_grad():
            values = scorer.model(torch.tensor([ref.input_ids]))[0]
        want = torch.sigmoid(values[torch.tensor(ref.step_labels) >= 0])
        torch.testing.assert_close(torch.tensor(b.info["steps"]), want, atol=1e-5, rtol=0)


def test_prm_scorer_edge_cases(saved):
    prompts, completions, problems = _chats()
    scorer = ModelScorer(str(saved["prm"]), agg="last")
    cut = completions[-1].split("</think>")[0]  # no end token: the unfinished last step is not scored
    eos = scorer.tokenizer.eos_token
    res = scorer(prompts[-1:] * 3, [cut, "  ", completions[-1] + eos], [{}] * 3)
    assert len(res[0].info["steps"]) == len(problems[-1].steps) - 1
    assert res[1].score == 0.0 and res[1].why == "empty completion"
    full = scorer(prompts[-1:], completions[-1:])[0]
    assert res[2].score == pytest.approx(full.score) and full.score == full.info["steps"][-1]


def test_orm_scorer_reads_the_last_token_and_is_batch_invariant(saved):
    prompts, completions, _ = _chats()
    scorer = ModelScorer(str(saved["orm"]), batch_size=16)
    batched = scorer(prompts, completions)
    single = ModelScorer(str(saved["orm"]), batch_size=1)(prompts, completions)
    for b, s in zip(batched, single, strict=True):
        assert b.score == pytest.approx(s.score, abs=1e-5)
    ids = torch.tensor([scorer._sample(prompts[0], completions[0])[0]])
    with torch.no_grad():
        want = last_token_values(scorer.model(ids), torch.ones_like(ids))
    assert batched[0].score == pytest.approx(float(want), abs=1e-5)
    assert ids[0, -1] == scorer.tokenizer.eos_token_id  # the end-of-turn token


def test_registered_rm_and_prm_rewards_dispatch_by_metadata(saved):
    prompts, completions, _ = _chats()
    meta = [
        {"scorer": "prm", "reward_model": str(saved["prm"]), "prm_agg": "mean"},
        {"scorer": "rm", "reward_model": str(saved["orm"])},
        {"scorer": "prm", "reward_model": str(saved["prm"])},
    ]
    out = score_batch(prompts[:3], completions[:3], meta)
    assert [r.info["scorer"] for r in out] == ["prm", "rm", "prm"]
    assert out[0].score == pytest.approx(sum(out[0].info["steps"]) / len(out[0].info["steps"]))
    assert out[2].score == pytest.approx(min(out[2].info["steps"]))
    with pytest.raises(DataError, match="reward_model"):
        get_reward("rm")(prompts[:1], completions[:1], [{}])
