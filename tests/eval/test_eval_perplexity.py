"""Perplexity masked like SFT: hand values, a hand loop over tokens, and `posttrain eval` output."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from posttrain.eval.perplexity import PerplexityConfig, load_samples, perplexity_metrics, sample_nll, scored
from posttrain.eval.runner import EvalRecipe, run_eval
from posttrain.search.compare import SearchModelConfig

CHATS = [
    {"messages": [{"role": "user", "content": "What is 2+3?"}, {"role": "assistant", "content": "Answer: 5"}]},
    {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Sort 3 1 2"},
                  {"role": "assistant", "content": "1 2 3"}, {"role": "user", "content": "Reverse it"},
                  {"role": "assistant", "content": "3 2 1"}]},
    {"messages": [{"role": "user", "content": "Compute 12 + 7"}, {"role": "assistant", "content": "12 + 7 = 19\nAnswer: 19"}]},
]  # fmt: skip


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def test_perplexity_metrics_hand_values():
    m = perplexity_metrics([2.0, 4.0], [1, 3], n_boot=200)
    assert m["nll_per_token"]["value"] == pytest.approx(1.5)  # token-weighted, not the mean of 2 and 4/3
    assert m["perplexity"]["value"] == pytest.approx(math.exp(1.5))
    assert m["tokens"]["value"] == 4 and m["perplexity"]["n"] == 2
    # resampling two samples can only give ratios 2 (both first), 4/3 (both second) or 1.5
    assert 4 / 3 - 1e-9 <= m["nll_per_token"]["ci_low"] <= 1.5 <= m["nll_per_token"]["ci_high"] <= 2 + 1e-9


def test_ratio_bootstrap_covers_known_mean():
    rng = np.random.default_rng(1)
    tokens = rng.integers(5, 50, size=400)
    nll = tokens * 2.0 + rng.normal(0, 3, size=400)  # true per-token NLL 2
    m = perplexity_metrics(nll.tolist(), tokens.tolist())
    assert m["nll_per_token"]["ci_low"] < 2.0 < m["nll_per_token"]["ci_high"]
    assert m["nll_per_token"]["ci_high"] - m["nll_per_token"]["ci_low"] < 0.1


def hand_nll(model, sample) -> tuple[float, int]:
    """-sum log p(x_t | x_<t) over labelled t, one position at a time from full logits."""
    ids = torch.tensor([sample.input_ids])
    logits = model(input_ids=ids).logits[0].double()
    total, n = 0.0, 0
    for t in range(1, len(sample.input_ids)):
        if sample.labels[t] == -100:
            continue
        total -= float(torch.log_softmax(logits[t - 1], -1)[sample.input_ids[t]])
        n += 1
    return total, n


@pytest.mark.parametrize("train_on", ["assistant", "all"])
def test_sample_nll_matches_hand_loop(tiny_model_dir, tmp_path, train_on):
    from posttrain.models.load import load_model, load_tokenizer

    tok = load_tokenizer(str(tiny_model_dir))
    model = load_model(str(tiny_model_dir), tokenizer=tok).eval()
    cfg = PerplexityConfig(path=write_jsonl(tmp_path / "chat.jsonl", CHATS), train_on=train_on, batch_size=2)
    samples = load_samples(cfg, tok)
    assert len(samples) == 3
    nll, tokens = sample_nll(model, samples, tok.pad_token_id, batch_size=2)
    with torch.no_grad():
        hand = [hand_nll(model, s) for s in samples]
    assert tokens == [n for _, n in hand] == [scored(s) for s in samples]
    assert nll == pytest.approx([h for h, _ in hand], rel=1e-4)
    if train_on == "assistant":  # the prompt is masked: fewer tokens than the whole chat
        assert all(n < len(s.input_ids) - 1 for n, s in zip(tokens, samples, strict=True))


def test_text_records_score_every_token_after_the_first(tiny_model_dir, tmp_path):
    from posttrain.models.load import load_model, load_tokenizer

    tok = load_tokenizer(str(tiny_model_dir))
    model = load_model(str(tiny_model_dir), tokenizer=tok).eval()
    path = write_jsonl(tmp_path / "text.jsonl", [{"text": "12 + 7 = 19"}, {"text": "sort 3 1 2 gives 1 2 3"}])
    samples = load_samples(PerplexityConfig(path=path), tok)
    assert [s.n_trained for s in samples] == [len(s.input_ids) - 1 for s in samples]
    nll, _ = sample_nll(model, samples, tok.pad_token_id)
    with torch.no_grad():
        assert nll == pytest.approx([hand_nll(model, s)[0] for s in samples], rel=1e-4)


def test_eval_recipe_reports_perplexity(tiny_model_dir, tmp_path):
    path = write_jsonl(tmp_path / "chat.jsonl", CHATS)
    recipe = EvalRecipe(
        model=SearchModelConfig(path=str(tiny_model_dir)), data=[],
        perplexity=[PerplexityConfig(path=path), PerplexityConfig(path="tasks", tasks=["arith"], n_per_level=2)],
        output_dir=str(tmp_path / "out"),
    )  # fmt: skip
    res = json.loads(run_eval(recipe).read_text())
    m = res["metrics"]["perplexity/chat"]
    assert m["perplexity"]["value"] == pytest.approx(math.exp(m["nll_per_token"]["value"]))
    assert m["perplexity"]["ci_low"] <= m["perplexity"]["value"] <= m["perplexity"]["ci_high"]
    assert m["perplexity"]["n"] == 3
    assert res["metrics"]["perplexity/tasks"]["perplexity"]["value"] > 1
    assert "## perplexity/chat" in (tmp_path / "out" / "report.md").read_text()
