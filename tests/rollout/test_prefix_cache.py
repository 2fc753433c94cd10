"""Prompt KV reuse across generate calls: the same completions as a plain prefill, fewer tokens run."""

from __future__ import annotations

import pytest
import torch

from posttrain.models.load import load_model, load_tokenizer
from posttrain.rollout.hf_engine import HFEngine
from posttrain.rollout.prefix_cache import PrefixStore, common_prefix
from posttrain.rollout.sampling import SamplingParams

ROOTS = ["Compute 3 + 4 and then", "Sort 5 2 9 1", "Compute 11 - 6 + 2"]
LOGP_TOL = 1e-4  # a different padding layout: fp32 summation-order noise only


@pytest.fixture(scope="module")
def model_and_tok(tiny_model_dir):
    tok = load_tokenizer(tiny_model_dir)
    return load_model(tiny_model_dir, dtype="float32", device="cpu", tokenizer=tok), tok


def test_store_lookup_caps_at_all_but_one_token_and_evicts_least_recent():
    kv = lambda n: [(torch.arange(n).view(1, n, 1).float(), torch.zeros(1, n, 1))]  # noqa: E731
    store = PrefixStore(max_tokens=10)
    store.add((1, 2, 3, 4), kv(4))
    m, got = store.lookup((1, 2, 3, 9, 9))
    assert m == 3 and got[0][0].flatten().tolist() == [0, 1, 2]  # the first 3 columns of the entry
    assert store.lookup((1, 2, 3, 4))[0] == 3  # never the whole prompt: one token must run
    assert store.lookup((7, 8))[0] == 0
    store.add((5, 6, 7), kv(3))
    store.lookup((1, 2, 0))  # touches (1, 2, 3, 4): now most recent
    store.add((8, 8, 8, 8), kv(4))  # 11 tokens > 10: the least recently used, (5, 6, 7), goes
    assert list(store.entries) == [(1, 2, 3, 4), (8, 8, 8, 8)] and store.tokens == 8
    assert common_prefix((1, 2), (1, 2, 3)) == 2


@pytest.mark.parametrize(
    "params",
    [
        SamplingParams(temperature=0.0, max_new_tokens=12),
        SamplingParams(n=3, temperature=1.0, max_new_tokens=10, seed=4),
    ],
    ids=["greedy", "sampled"],
)
def test_reused_prefixes_give_the_plain_prefill_completions(model_and_tok, params):
    """A tree-search pattern: the second call's prompts extend the first call's prompts by their
    completions; with the store the extended prompts run only their new tokens."""
    model, tok = model_and_tok
    plain, cached = HFEngine(model, tok), HFEngine(model, tok, prefix_cache_tokens=4096)
    first = [plain.generate(ROOTS, params), cached.generate(ROOTS, params)]
    children = [ROOTS[c.prompt_index] + c.text for c in first[0]]
    second = [plain.generate(children, params), cached.generate(children, params)]
    for run in (first, second):
        ref, got = run
        assert [c.token_ids for c in got] == [c.token_ids for c in ref]
        diff = max(
            abs(x - y)
            for c, d in zip(ref, got, strict=True)
            for x, y in zip(c.logprobs, d.logprobs, strict=True)
        )
        assert diff < LOGP_TOL, diff
    assert cached.prefix.hits >= len(children) and cached.prefix.reused_tokens >= sum(
        len(tok(r)["input_ids"]) - 1 for r in ROOTS
    )


def test_update_weights_clears_the_store(model_and_tok):
    model, tok = model_and_tok
    engine = HFEngine(model, tok, prefix_cache_tokens=4096)
    engine.generate(ROOTS, SamplingParams(temperature=0.0, max_new_tokens=4))
    assert engine.prefix.entries
    engine.update_weights(model)  # the trainer's own module: no copy, but the weights may have moved
    assert not engine.prefix.entries and engine.prefix.tokens == 0
