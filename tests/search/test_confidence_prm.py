"""Confidence PRM (`posttrain.search.confidence`): step features by hand, padding-free batching,
the saved folder as a `conf:PATH` scorer in search, and its bad inputs."""

from __future__ import annotations

import math

import pytest
import torch

from posttrain.errors import ConfigError
from posttrain.search.confidence import (
    ConfHead,
    ConfScorer,
    load_conf,
    policy_step_features,
    save_conf,
    select_features,
    step_ends,
    step_features,
)
from posttrain.search.protocols import ScoreRequest
from posttrain.search.scorer_specs import build_scorer, parse_scorer

pytestmark = pytest.mark.usefixtures("one_torch_thread")
SEP, END = 7, 9


def test_step_features_by_hand():
    logp = torch.tensor([0.0, -1.0, -3.0, -2.0, -0.5, -0.5, -4.0])
    ent = torch.tensor([9.0, 1.0, 2.0, 3.0, 0.5, 1.5, 9.0])
    x = step_features(logp, ent, ends=[3, 5], start=1)
    # step 1 = tokens 1..3, step 2 = tokens 4..5; token 0 (prompt) and 6 (after the end) unused
    want = torch.tensor([[-2.0, -3.0, 2.0, 3.0], [-0.5, -0.5, 1.0, 1.5]])
    assert torch.allclose(x, want)
    assert step_features(logp, ent, [], 1).shape == (0, 4)


def test_step_ends_finished_unfinished_and_after_the_end():
    ids = torch.tensor([1, 2, 3, SEP, 4, 4, END, 5, SEP, 6])
    assert step_ends(ids, 1, 10, SEP, END) == [3, 6]  # the separator after </think> is not a step end
    assert step_ends(ids, 1, 6, SEP, END) == [3, 5]  # unfinished: the trailing step ends at the last token
    assert step_ends(ids, 1, 4, SEP, END) == [3]  # ends right at a separator: no empty extra step
    assert step_ends(ids, 1, 10, SEP, None) == [3, 8, 9]


def test_select_features_and_unknown_name():
    x = torch.arange(8.0).reshape(2, 4)
    assert select_features(x, ["min_logp", "max_entropy"]).tolist() == [[1.0, 3.0], [5.0, 7.0]]
    with pytest.raises(ConfigError, match="min_lp"):
        select_features(x, ["min_lp"])


def test_features_do_not_depend_on_batching(tiny_model_dir):
    from posttrain.models.load import load_model, load_tokenizer

    tok = load_tokenizer(tiny_model_dir)
    model = load_model(tiny_model_dir, tokenizer=tok).eval()
    q = [{"role": "user", "content": "Compute 3 + 4 + 5"}]
    texts = ["<think>\n3 + 4 = 7<step>7 + 5 = 12\n</think>\n\nAnswer: 12", "<think>\n3 + 4 = 8<step>",
             "<think>\n3 + 4 = 7<step>7 + 5", "<think>\n3 + 4 = 7<step>7 + 5 = 13<step>13 - 1 = 12\n</think>"]  # fmt: skip
    one = policy_step_features(model, tok, [q] * 4, texts, "<step>", "</think>", batch_size=1)
    four = policy_step_features(model, tok, [q] * 4, texts, "<step>", "</think>", batch_size=4)
    assert [len(x) for x in one] == [2, 1, 2, 3]
    for a, b in zip(one, four, strict=True):
        assert torch.allclose(a, b, atol=1e-4)
    assert all(bool((x[:, 1] <= x[:, 0] + 1e-6).all()) for x in one)  # min log-prob <= mean
    # against the whole (T, V) log-softmax of one full forward (what the chunked head replaces)
    from posttrain.data.render import render_prompt_completion

    for text, got in zip(texts, one, strict=True):
        sample = render_prompt_completion(tok, q, text)
        ids = torch.tensor([sample.input_ids])
        start = next(i for i, y in enumerate(sample.labels) if y != -100)
        with torch.no_grad():
            logp = torch.log_softmax(model(input_ids=ids).logits.float(), -1)[0]
        token = torch.cat([torch.zeros(1), logp[:-1].gather(-1, ids[0, 1:, None])[:, 0]])
        entropy = torch.cat([torch.zeros(1), -(logp.exp() * logp).sum(-1)[:-1]])
        sep, end = tok.convert_tokens_to_ids("<step>"), tok.convert_tokens_to_ids("</think>")
        stop = ids.shape[1]
        while stop > start and int(ids[0, stop - 1]) in set(tok.all_special_ids) - {sep, end}:
            stop -= 1  # the template's end-of-turn tokens are not part of the path
        want = step_features(token, entropy, step_ends(ids[0], start, stop, sep, end), start)
        torch.testing.assert_close(got, want, atol=1e-4, rtol=0)


@pytest.fixture
def conf_dir(tiny_model_dir, tmp_path):
    head = ConfHead(w=[2.0, 1.0], b=0.5, mu=[-1.0, -2.0], sd=[0.5, 1.0], features=("mean_logp", "min_logp"))
    return save_conf(
        head, tiny_model_dir, tmp_path / "conf", {"step_sep": "<step>", "last_step_end": "</think>"}
    )


def test_conf_scorer_in_search_matches_head_on_features(conf_dir):
    spec = parse_scorer(f"conf:{conf_dir}")
    assert (spec.kind, spec.agg, spec.oracle) == ("conf", "min", False)
    assert parse_scorer(str(conf_dir)).kind == "conf"  # a bare folder: its saved kind
    assert parse_scorer(f"conf:last:{conf_dir}").agg == "last"
    scorer = build_scorer(parse_scorer(f"conf:min:{conf_dir}"))
    meta = {"question": "Compute 3 + 4 + 5"}
    reqs = [ScoreRequest("p", ["3 + 4 = 7", "7 + 5 = 12"], "<think>\n3 + 4 = 7<step>7 + 5 = 12\n</think>\n\nAnswer: 12",
                         True, meta),
            ScoreRequest("p", ["3 + 4 = 8"], "<think>\n3 + 4 = 8<step>", False, meta)]  # fmt: skip
    got = scorer.score(reqs)
    raw = ConfScorer(str(conf_dir))
    head, _ = load_conf(conf_dir)
    q = [{"role": "user", "content": meta["question"]}]
    feats = policy_step_features(
        raw.model, raw.tokenizer, [q, q], [r.text for r in reqs], "<step>", "</think>"
    )
    for row, x in zip(got, feats, strict=True):
        p = [1 / (1 + math.exp(-float(z))) for z in head.logits(x)]
        assert row == pytest.approx([min(p[: i + 1]) for i in range(len(p))], abs=1e-5)  # running min
    assert len(got[0]) == 2 and len(got[1]) == 1


def test_conf_spec_errors(conf_dir, tmp_path):
    with pytest.raises(ConfigError, match="holds a conf model"):
        parse_scorer(f"prm:{conf_dir}")
    plain = tmp_path / "plain"
    plain.mkdir()
    with pytest.raises(ConfigError, match="not a reward or value model folder"):
        parse_scorer(f"conf:{plain}")
