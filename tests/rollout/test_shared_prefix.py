"""Decode attention over shared prompts (`posttrain.rollout.shared_prefix`): the same logits as
the expanded cache, with padded prompts, uneven rows per prompt and dropped rows; the engine's
completions unchanged by it; and the rule that decides when it is used."""

from __future__ import annotations

import pytest
import test_fused
import torch
from test_fused import padded_batch

from posttrain.rollout import hf_engine
from posttrain.rollout.fused import FusedLM
from posttrain.rollout.hf_engine import HFEngine, compact_order, new_cache, shared_cache, unshare
from posttrain.rollout.sampling import SamplingParams
from posttrain.rollout.shared_prefix import GroupCache, worth_sharing

TOL = 1e-5  # fp32: the two layouts only reorder sums


@pytest.fixture(scope="module")
def llama():
    return test_fused.llama(hidden_size=96, num_attention_heads=6)  # 3 query heads per key/value head


def decode_both(model, lengths, expand, steps, drops, unshare_at=None):
    """Prefill the prompts once, then decode the same random tokens through an expanded reserved
    cache and through a `GroupCache`; ``drops``: {step: rows finishing then}; ``unshare_at``: the
    step after which the `GroupCache` goes back to an expanded cache (`hf_engine.unshare`).
    Returns the logits of every step, both ways."""
    fused = FusedLM(model, torch.float32)
    ids, mask, pos = padded_batch(300, lengths, seed=1)
    width = ids.shape[1]
    caches = []
    for shared in (False, True):
        cache = new_cache(model, width + steps)
        fused.forward(ids, pos, mask.bool(), cache)
        if shared:
            cache = shared_cache(fused, cache, mask, expand, steps)
        else:
            cache.batch_select_indices(expand)
        caches.append(cache)
    assert isinstance(caches[1], GroupCache) and caches[1].width == int(torch.bincount(expand).max())
    keys = torch.cat([mask[expand], mask.new_ones((expand.numel(), steps))], dim=1).bool()
    nxt = pos[expand, -1] + 1
    gen = torch.Generator().manual_seed(2)
    out = ([], [])
    shared_keys = None
    for t in range(steps):
        tok = torch.randint(3, 300, (nxt.numel(), 1), generator=gen)
        for i, cache in enumerate(caches):
            out[i].append(fused.forward(tok, (nxt + t)[:, None], shared_keys if i else keys, cache))
        if t in drops:
            live = torch.ones(nxt.numel(), dtype=torch.bool)
            live[drops[t]] = False
            keep = compact_order(live)
            for cache in caches:
                cache.batch_select_indices(keep)
            keys, nxt = keys[keep], nxt[keep]
        if t == unshare_at:
            caches[1] = hf_engine.unshare(model, caches[1], width + steps)
            assert caches[1].get_seq_length() == width + t + 1
            shared_keys = keys
    return out


def test_group_attention_equals_the_expanded_cache(llama):
    """Three left-padded prompts with 3, 1 and 2 rows (dead slots in the layout), a duplicate
    order of rows, and rows dropped at two steps (moving rows into holes)."""
    expand = torch.tensor([0, 2, 0, 1, 2, 0])
    plain, shared = decode_both(llama, [5, 9, 7], expand, steps=6, drops={1: [0, 3], 3: [1]})
    assert [x.shape[0] for x in shared] == [6, 6, 4, 4, 3, 3]
    for a, b in zip(plain, shared, strict=True):
        torch.testing.assert_close(b, a, atol=TOL, rtol=0)
    assert (plain[-1] - plain[0][: plain[-1].shape[0]]).abs().max() > 1e-2  # the steps did differ


def test_going_back_to_an_expanded_cache_keeps_the_logits(llama):
    expand = torch.tensor([0, 0, 0, 1, 1, 2])
    plain, shared = decode_both(llama, [5, 9, 7], expand, steps=6, drops={1: [0, 4]}, unshare_at=2)
    for a, b in zip(plain, shared, strict=True):
        torch.testing.assert_close(b, a, atol=TOL, rtol=0)


def test_group_attention_without_padding(llama):
    plain, shared = decode_both(llama, [6, 6], torch.tensor([0, 0, 1, 1]), steps=4, drops={})
    for a, b in zip(plain, shared, strict=True):
        torch.testing.assert_close(b, a, atol=TOL, rtol=0)


class IdTokenizer:
    """What the engine needs of a tokenizer when prompts are token ids."""

    pad_token_id, eos_token_id = 0, 1

    def batch_decode(self, seqs, skip_special_tokens=True):
        return [" ".join(map(str, s)) for s in seqs]


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_engine_completions_do_not_change_with_shared_prompts(llama, temperature):
    prompts = [[5, 6, 7, 8], [9, 10], [5, 6, 7, 8], [11, 12, 13, 14, 15, 16]]  # one repeated
    params = SamplingParams(n=3, max_new_tokens=10, temperature=temperature, seed=7)
    outs = []
    for share in (False, True):
        engine = HFEngine(llama, IdTokenizer(), share_prompts=share, threads=0)
        outs.append(engine.generate(prompts, params))
    plain, shared = outs
    assert [c.token_ids for c in shared] == [c.token_ids for c in plain]
    for a, b in zip(plain, shared, strict=True):
        torch.testing.assert_close(torch.tensor(b.logprobs), torch.tensor(a.logprobs), atol=TOL, rtol=0)


def test_worth_sharing_counts_the_reads_saved():
    # SmolLM2 (3 key/value heads of 64), 4 prompts x 8: 28 rows x 55 columns x 1536 B = 2.4 MB
    assert not worth_sharing(32, 4, 55, 3, 64)
    assert worth_sharing(32, 4, 100, 3, 64)  # 4.3 MB
    assert not worth_sharing(4, 4, 10_000, 3, 64)  # one row per prompt: nothing to share


def test_engine_shares_long_prompts_by_default(llama, monkeypatch):
    calls = []
    monkeypatch.setattr(hf_engine, "shared_cache", lambda *a: calls.append(a[3].numel()) or shared_cache(*a))
    engine = HFEngine(llama, IdTokenizer(), threads=0)
    params = SamplingParams(n=4, max_new_tokens=2, temperature=1.0, seed=0)
    engine.generate([list(range(3, 10))], params)  # 3 rows x 7 columns x 256 B: not worth it
    assert calls == []
    engine.generate(
        [list(range(3, 263)), list(range(5, 265))], SamplingParams(n=32, max_new_tokens=2, seed=0)
    )
    assert calls == [64]  # 62 rows x 260 columns x 256 B = 4.1 MB saved a layer


def test_engine_unshares_when_few_rows_of_a_prompt_remain(llama, monkeypatch):
    """Long prompts with many rows share; stop ids end ~20% of rows a step, and once the rows left
    save too little the engine goes back to expanded rows: the completions stay those of an
    engine that never shares."""
    calls = []
    monkeypatch.setattr(hf_engine, "unshare", lambda *a: calls.append(a[1].slot.numel()) or unshare(*a))
    prompts = [list(range(3, 263)), list(range(5, 265))]
    params = SamplingParams(n=32, max_new_tokens=12, seed=3, stop_token_ids=list(range(3, 63)))
    auto = HFEngine(llama, IdTokenizer(), threads=0).generate(prompts, params)
    plain = HFEngine(llama, IdTokenizer(), threads=0, share_prompts=False).generate(prompts, params)
    assert len(calls) == 1 and 2 < calls[0] < 64
    assert [c.token_ids for c in auto] == [c.token_ids for c in plain]
    lengths = {len(c.token_ids) for c in auto}
    assert min(lengths) < max(lengths)  # rows did finish at different steps
