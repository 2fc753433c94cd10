"""The HF rollout engine on a tiny model: correctness of padding, sharing, log-probs and stopping."""

from __future__ import annotations

import pytest
import torch

from posttrain.errors import ModelError
from posttrain.models.load import load_model, load_tokenizer
from posttrain.rollout.engine import by_prompt
from posttrain.rollout.fused import FusedLM
from posttrain.rollout.hf_engine import (
    HFEngine,
    compact_order,
    decode_mask,
    decode_precision,
    new_cache,
    sample_next,
)
from posttrain.rollout.sampling import SamplingParams
from posttrain.train.lm_loss import token_logprobs

PROMPTS = ["Compute 3 + 4", "Sort 5 2 9 1 and then add up 12 and 7", "Hi", "Compute 11 - 6 + 2"]
LOGP_TOL = 1e-4  # incremental KV-cache decoding vs one full forward: fp32 summation-order noise


@pytest.fixture(scope="module", params=[True, False], ids=["fused", "hf-forward"])
def engine(tiny_model_dir, request):
    """The engine on the tiny default (Qwen2): with its fused forward (the default on CPU) and
    with HF's forward; every test below holds for both."""
    tok = load_tokenizer(tiny_model_dir)
    model = load_model(tiny_model_dir, dtype="float32", device="cpu", tokenizer=tok)
    eng = HFEngine(model, tok, fused=request.param)
    assert isinstance(eng._decoder(), FusedLM) is request.param, eng.fused_reason
    return eng


class ForwardRecorder:
    """Records the batch size of every forward call the engine makes (its FusedLM's or the model's)."""

    def __init__(self, engine):
        self.sizes: list[int] = []
        net = engine._decoder()
        if isinstance(net, FusedLM):
            inner = net.forward
            net.forward = lambda ids, *rest: self.sizes.append(ids.shape[0]) or inner(ids, *rest)
            self.undo = lambda: delattr(net, "forward")
        else:
            handle = engine.model.register_forward_pre_hook(self.hook, with_kwargs=True)
            self.undo = handle.remove

    def hook(self, module, args, kwargs):
        self.sizes.append(kwargs["input_ids"].shape[0])

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.undo()


def greedy(max_new=12, **kw) -> SamplingParams:
    return SamplingParams(temperature=0.0, max_new_tokens=max_new, **kw)


@pytest.fixture(scope="module")
def gpt2_engine(engine):
    """A tiny GPT-2: learned absolute position embeddings, so wrong position ids under left
    padding change its outputs (RoPE models only see relative positions)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    eos = engine.tokenizer.eos_token_id
    cfg = GPT2Config(
        vocab_size=len(engine.tokenizer),
        n_positions=128,
        n_embd=32,
        n_layer=2,
        n_head=2,
        bos_token_id=eos,
        eos_token_id=eos,
    )
    model = GPT2LMHeadModel(cfg).eval()
    with torch.no_grad():
        model.transformer.wpe.weight.normal_(0, 1.0)  # make positions matter a lot
    return HFEngine(model, engine.tokenizer)


@pytest.mark.parametrize("which", ["qwen2", "gpt2"])
def test_left_padded_batch_matches_each_prompt_alone(engine, gpt2_engine, which):
    engine = engine if which == "qwen2" else gpt2_engine
    batch = engine.generate(PROMPTS, greedy(16))
    for i, prompt in enumerate(PROMPTS):
        alone = engine.generate([prompt], greedy(16))[0]
        assert batch[i].token_ids == alone.token_ids
        assert batch[i].logprobs == pytest.approx(alone.logprobs, abs=LOGP_TOL)
    # and plain HF generate (no padding) agrees on the greedy tokens
    ids = torch.tensor([batch[1].prompt_ids])
    ref = engine.model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=16)
    assert batch[1].token_ids == ref[0, ids.shape[1] :].tolist()[: len(batch[1].token_ids)]


def test_sliding_window_model_keeps_its_cache_and_matches_generate(engine):
    from transformers import MistralConfig, MistralForCausalLM

    torch.manual_seed(0)
    cfg = MistralConfig(
        vocab_size=len(engine.tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        sliding_window=4,  # shorter than the prompts
    )
    model = MistralForCausalLM(cfg).eval()
    assert {type(layer).__name__ for layer in new_cache(model, 8).layers} == {"DynamicSlidingWindowLayer"}
    assert {type(layer).__name__ for layer in new_cache(engine.model, 8).layers} == {"ReservedLayer"}
    out = HFEngine(model, engine.tokenizer).generate(PROMPTS[:2], greedy(12))
    for c in out:
        ids = torch.tensor([c.prompt_ids])
        ref = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=12)
        assert c.token_ids == ref[0, ids.shape[1] :].tolist()[: len(c.token_ids)]


def batch_of(completions, pad_id):
    """Right-padded training batch with labels on the generated tokens only."""
    width = max(len(c.prompt_ids) + len(c.token_ids) for c in completions)
    ids = torch.full((len(completions), width), pad_id)
    labels = torch.full((len(completions), width), -100)
    attn = torch.zeros((len(completions), width), dtype=torch.long)
    for i, c in enumerate(completions):
        seq = c.prompt_ids + c.token_ids
        ids[i, : len(seq)] = torch.tensor(seq)
        attn[i, : len(seq)] = 1
        labels[i, len(c.prompt_ids) : len(seq)] = torch.tensor(c.token_ids)
    return {"input_ids": ids, "labels": labels, "attention_mask": attn}


@pytest.mark.parametrize(
    "params",
    [
        SamplingParams(n=3, temperature=1.0, max_new_tokens=20, seed=0),
        SamplingParams(n=3, temperature=0.7, top_k=20, top_p=0.9, max_new_tokens=20, seed=1),
        SamplingParams(temperature=0.0, max_new_tokens=20),
    ],
    ids=["t1", "t0.7-topk-topp", "greedy"],
)
def test_generation_logprobs_equal_recomputed_forward(engine, params):
    """Old log-probs of the first PPO epoch can come from generation: they equal a fresh forward
    (token_logprobs at the sampling temperature, untruncated by top-k/top-p; T=1 for greedy)."""
    completions = engine.generate(PROMPTS, params)
    with torch.no_grad():
        logp, _, _ = token_logprobs(
            engine.model, batch_of(completions, engine.pad_id), temperature=params.temperature or 1.0
        )
    generated = torch.tensor([lp for c in completions for lp in c.logprobs])
    assert logp.shape == generated.shape
    assert torch.allclose(logp, generated, atol=LOGP_TOL, rtol=0)
    assert (generated <= 0).all()


def test_first_minibatch_ratio_one_and_kl_zero(engine):
    """PPO's first mini-batch with the rollout's log-probs as old log-probs: ratio 1 (to LOGP_TOL),
    nothing clipped; the reference = the same weights: every KL estimator is exactly 0."""
    from posttrain.algos.kl import kl_in_loss
    from posttrain.algos.policy_losses import ppo_clip_loss

    completions = engine.generate(PROMPTS, SamplingParams(n=2, temperature=1.0, max_new_tokens=12, seed=5))
    batch = batch_of(completions, engine.pad_id)
    logp, _, _ = token_logprobs(engine.model, batch)
    with torch.no_grad():
        ref_logp, _, _ = token_logprobs(engine.model, batch)
    old = torch.tensor([lp for c in completions for lp in c.logprobs])
    mask = torch.ones_like(old)
    adv = torch.randn_like(old)
    loss, metrics = ppo_clip_loss(logp[None], old[None], adv[None], mask[None], clip_low=1e-3, clip_high=1e-3)
    assert abs(metrics["pg/ratio_max"].item() - 1) < LOGP_TOL and metrics["pg/clip_frac"] == 0
    for kind in ("k1", "k2", "k3"):
        kl, kl_metrics = kl_in_loss(logp[None], ref_logp[None], mask[None], coef=1.0, kind=kind)
        assert kl.item() == 0.0 and kl_metrics["kl/token_mean"] == 0.0
    (loss + kl).backward()  # the policy loss is differentiable through the recomputed log-probs
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in engine.model.parameters())
    engine.model.zero_grad(set_to_none=True)


def test_seed_reproducible_and_groups_ordered(engine):
    params = SamplingParams(n=4, temperature=1.0, max_new_tokens=10, seed=7)
    first, again = engine.generate(PROMPTS[:2], params), engine.generate(PROMPTS[:2], params)
    assert [c.token_ids for c in first] == [c.token_ids for c in again]
    other = engine.generate(PROMPTS[:2], params.replace(seed=8))
    assert [c.token_ids for c in first] != [c.token_ids for c in other]
    assert [(c.prompt_index, c.sample_index) for c in first] == [(i, s) for i in range(2) for s in range(4)]
    groups = by_prompt(first)
    assert len(groups) == 2 and all(len(g) == 4 for g in groups)
    assert len({tuple(c.token_ids) for c in groups[0]}) > 1  # n samples differ


def test_prefix_sharing_prefills_each_distinct_prompt_once(engine):
    prompts = [PROMPTS[0], PROMPTS[1], PROMPTS[0]]
    with ForwardRecorder(engine) as rec:
        out = engine.generate(prompts, SamplingParams(n=4, temperature=1.0, max_new_tokens=5, seed=0))
    assert rec.sizes[0] == 2  # prefill: 2 distinct prompts, not 3 x 4 rows
    assert rec.sizes[1] == 12  # then every sample decodes
    assert len(out) == 12 and out[8].prompt_ids == out[0].prompt_ids
    assert [c.prompt_index for c in out[8:]] == [2] * 4


def test_finished_rows_stop_costing_compute(engine):
    # stop on many frequent ids: rows finish at different steps
    probe = engine.generate(PROMPTS, SamplingParams(n=4, temperature=1.0, max_new_tokens=30, seed=3))
    frequent = torch.tensor([t for c in probe for t in c.token_ids]).bincount().argsort(descending=True)[:20]
    params = SamplingParams(n=4, temperature=1.0, max_new_tokens=30, seed=3, stop_token_ids=frequent.tolist())
    with ForwardRecorder(engine) as rec:
        out = engine.generate(PROMPTS, params)
    lengths = [len(c.token_ids) for c in out]
    assert len(set(lengths)) > 2 and min(lengths) < 30
    decode = rec.sizes[1:]
    assert decode == sorted(decode, reverse=True) and decode[-1] < decode[0]
    # a row of L tokens is in L - 1 decode forwards (its first token comes from the prefill)
    assert sum(decode) == sum(n - 1 for n in lengths)
    # the engine's own counts say the same (what bench/rollout.py divides its decode time by)
    assert engine.stats["steps"] == len(decode) == max(lengths) - 1
    assert engine.stats["row_steps"] == sum(decode)
    assert engine.stats["decode_s"] > 0 and engine.stats["prefill_s"] > 0
    stops = set(params.stop_token_ids) | set(engine.eos_ids)
    for c in out:
        assert c.finish_reason == ("stop" if c.token_ids[-1] in stops else "length")
        assert not set(c.token_ids[:-1]) & stops


def test_reserved_cache_selects_rows_like_indexing(engine):
    """Dropping rows in place (compact_order) and any other selection equal plain indexing."""
    torch.manual_seed(0)
    cache = new_cache(engine.model, 8)
    k, v = torch.randn(6, 2, 5, 4), torch.randn(6, 2, 5, 4)
    cache.layers[0].update(k, v)
    layer = cache.layers[0]
    live = torch.tensor([True, False, True, True, False, True])
    order = compact_order(live)
    assert order.tolist() == [0, 5, 2, 3]  # rows in front stay, the last live row fills the hole
    ptr = layer._k.data_ptr()
    layer.batch_select_indices(order)
    assert layer._k.data_ptr() == ptr  # in place: no new buffers
    assert torch.equal(layer.keys, k[order]) and torch.equal(layer.values, v[order])
    for indices in ([1, 0, 3], [2, 0, 1, 1, 2, 0]):  # reordering, then growing (new buffers)
        expected = layer.keys[torch.tensor(indices)]
        layer.batch_select_indices(torch.tensor(indices))
        assert torch.equal(layer.keys, expected)
    layer.update(torch.ones(6, 2, 1, 4), torch.ones(6, 2, 1, 4))
    assert layer.keys.shape == (6, 2, 6, 4) and torch.equal(layer.keys[:, :, :5], expected)


def test_decode_mask(engine):
    cache = new_cache(engine.model, 8)
    padded = torch.tensor([[0, 1, 1], [1, 1, 1]])
    assert decode_mask(engine.model, cache, torch.ones_like(padded)) is None  # no padding: no mask
    mask = decode_mask(engine.model, cache, padded)  # sdpa: the 4D mask the model uses as is
    assert mask.shape == (2, 1, 1, 3) and torch.equal(mask[:, 0, 0], padded.bool())


def sampled(max_new=20, **kw) -> SamplingParams:
    """One seeded sample: a run with a stop condition replays the same tokens up to the stop."""
    return SamplingParams(temperature=1.0, max_new_tokens=max_new, seed=11, **kw)


def test_stop_token_id_and_length(engine):
    free = engine.generate([PROMPTS[0]], sampled(20))[0]
    cut = next(i for i, t in enumerate(free.token_ids) if i >= 3 and t not in free.token_ids[:i])
    stopped = engine.generate([PROMPTS[0]], sampled(20, stop_token_ids=[free.token_ids[cut]]))[0]
    assert stopped.token_ids == free.token_ids[: cut + 1]  # the stop id is kept
    assert stopped.finish_reason == "stop"
    out = engine.generate(PROMPTS, SamplingParams(n=4, max_new_tokens=6, seed=0))
    assert {c.finish_reason for c in out} == {"length"} or any(c.token_ids[-1] in engine.eos_ids for c in out)
    for c in out:
        ended = c.token_ids[-1] in engine.eos_ids
        assert (c.finish_reason, len(c.token_ids) == 6 or ended) == ("stop" if ended else "length", True)


def test_stop_string(engine):
    free = engine.generate([PROMPTS[2]], sampled(24))[0]
    tok = engine.tokenizer
    pieces = [tok.decode([t]) for t in free.token_ids]
    stop = next(p for p in pieces[3:] if p.strip() and p.isascii() and p.isprintable())
    out = engine.generate([PROMPTS[2]], sampled(24, stop=[stop]))[0]
    assert out.finish_reason == "stop" and stop in out.text
    assert stop not in tok.decode(out.token_ids[:-1], skip_special_tokens=True)  # stopped at the first hit
    assert out.token_ids == free.token_ids[: len(out.token_ids)]


def test_top_k_1_and_tiny_top_p_are_greedy(engine):
    ref = engine.generate(PROMPTS, greedy(10))
    for params in (
        SamplingParams(top_k=1, max_new_tokens=10, seed=0),
        SamplingParams(top_p=1e-6, max_new_tokens=10, seed=0),
    ):
        out = engine.generate(PROMPTS, params)
        assert [c.token_ids for c in out] == [c.token_ids for c in ref]
        # log-probs are the untruncated policy's (T = 1 here), not log 1 = 0
        flat = lambda cs: [lp for c in cs for lp in c.logprobs]  # noqa: E731
        assert flat(out) == pytest.approx(flat(ref), abs=1e-6)


def test_sample_next_truncation_and_frequencies():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]])).expand(20_000, 4)
    gen = torch.Generator().manual_seed(0)
    tok, logp = sample_next(logits, SamplingParams(top_p=0.7), gen)
    freq = tok.bincount(minlength=4).float() / tok.numel()
    assert freq[2:].sum() == 0  # 0.5 + 0.3 >= 0.7: only the first two survive
    assert freq[0].item() == pytest.approx(0.5 / 0.8, abs=0.02)
    assert torch.allclose(logp, torch.log(torch.tensor([0.5, 0.3]))[tok])  # untruncated log-prob
    tok, _ = sample_next(logits, SamplingParams(top_k=3, temperature=2.0), gen)
    p = torch.softmax(torch.log(torch.tensor([0.5, 0.3, 0.15])) / 2.0, -1)
    freq = tok.bincount(minlength=4).float() / tok.numel()
    assert freq[3] == 0 and torch.allclose(freq[:3], p, atol=0.02)


def test_chat_messages_and_records_use_the_chat_template(engine):
    messages = [{"role": "user", "content": "Compute 3 + 4"}]
    rendered = engine.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    expected = engine.tokenizer(rendered, add_special_tokens=False)["input_ids"]
    out = engine.generate([messages, {"prompt": messages}], greedy(4))
    assert out[0].prompt_ids == out[1].prompt_ids == expected
    assert out[0].token_ids == out[1].token_ids


def test_update_weights(engine, tiny_model_dir):
    engine.update_weights(engine.model)  # shared with the trainer: nothing to do
    other = load_model(tiny_model_dir, dtype="float32", device="cpu")
    with torch.no_grad():
        for p in other.parameters():
            p.add_(0.05 * torch.randn_like(p))
    mine = HFEngine(load_model(tiny_model_dir, dtype="float32", device="cpu"), engine.tokenizer)
    theirs = HFEngine(other, engine.tokenizer)
    before = mine.generate(PROMPTS, greedy(12))
    mine.update_weights(other.state_dict())
    after = mine.generate(PROMPTS, greedy(12))
    assert [c.token_ids for c in after] == [c.token_ids for c in theirs.generate(PROMPTS, greedy(12))]
    assert [c.token_ids for c in after] != [c.token_ids for c in before]
    with pytest.raises(ModelError, match="do not belong"):
        mine.update_weights({"value_head.weight": torch.zeros(1)})


def test_training_mode_restored(engine):
    engine.model.train()
    try:
        engine.generate(PROMPTS[:1], greedy(3))
        assert engine.model.training
    finally:
        engine.model.eval()


def test_bf16_engine_log_probs_stay_near_fp32_and_the_default_is_exact(tiny_model_dir):
    """precision=bf16 decodes under autocast: the sampled tokens' log-probs move (bf16 really ran)
    but stay within 0.1 nats of the fp32 forward; the class default stays fp32 (exact)."""
    tok = load_tokenizer(tiny_model_dir)
    model = load_model(tiny_model_dir, dtype="float32", device="cpu", tokenizer=tok)
    assert HFEngine(model, tok).precision == "fp32"
    bf16 = HFEngine(model, tok, precision="bf16")
    completions = bf16.generate(PROMPTS, SamplingParams(n=2, temperature=1.0, max_new_tokens=12, seed=3))
    with torch.no_grad():
        ref, _, _ = token_logprobs(model, batch_of(completions, bf16.pad_id))
    got = torch.tensor([lp for c in completions for lp in c.logprobs])
    diff = float((got - ref).abs().max())
    assert LOGP_TOL < diff < 0.1, diff


def test_bf16_decodes_on_a_weight_copy_that_update_weights_refreshes(tiny_model_dir):
    """bf16 on CPU: a bf16 copy of the weights (buffers such as RoPE frequencies stay fp32), so no
    decode step re-casts them; the copy follows the trainer's module after update_weights."""
    tok = load_tokenizer(tiny_model_dir)
    model = load_model(tiny_model_dir, dtype="float32", device="cpu", tokenizer=tok)
    engine = HFEngine(model, tok, precision="bf16", fused=False)
    net = engine._decoder()
    assert net is not model and all(p.dtype == torch.bfloat16 for p in net.parameters())
    assert all(b.dtype == torch.float32 for b in net.buffers() if b.is_floating_point())
    name, param = next(iter(model.named_parameters()))
    with torch.no_grad():
        param.add_(1.0)  # a training step on the shared module
    assert not torch.equal(dict(net.named_parameters())[name].float(), param.to(torch.bfloat16).float())
    engine.update_weights(model)
    assert engine._decoder() is net  # refreshed in place, not rebuilt
    assert torch.equal(dict(net.named_parameters())[name], param.detach().to(torch.bfloat16))
    assert HFEngine(model, tok, fused=False)._decoder() is model  # fp32: the module itself


def test_auto_decodes_small_models_in_fp32_where_bf16_is_native(tiny_model_dir, monkeypatch):
    """auto on a CPU with native bf16: models of hidden size <= 256 decode in fp32 (the reason says
    why), larger ones in bf16; an explicit bf16 is kept; without native bf16, auto is fp32."""
    from transformers import LlamaConfig, LlamaForCausalLM

    import posttrain.rollout.hf_engine as hf
    from posttrain.train.precision import Choice

    native = Choice("auto", "bf16", "native bf16 (test)")
    monkeypatch.setattr(
        hf,
        "resolve_precision",
        lambda req, dev, key: native if req != "fp32" else Choice(req, "fp32", "asked for"),
    )
    tok = load_tokenizer(tiny_model_dir)
    small = load_model(tiny_model_dir, dtype="float32", device="cpu", tokenizer=tok)
    cfg = dict(vocab_size=300, num_hidden_layers=1, num_attention_heads=4, intermediate_size=64)
    large = LlamaForCausalLM(LlamaConfig(hidden_size=288, **cfg))
    cpu = torch.device("cpu")
    precision, reason = decode_precision("auto", small, cpu)
    assert (
        precision == "fp32"
        and f"hidden_size {small.config.hidden_size} <= 256" in reason
        and "native bf16 (test)" in reason
    )
    assert decode_precision("auto", large, cpu) == ("bf16", "native bf16 (test)")
    assert decode_precision("bf16", small, cpu)[0] == "bf16"
    engine = HFEngine(small, tok, precision="auto")
    assert engine.precision == "fp32" and engine._decoder().dtype == torch.float32
    monkeypatch.setattr(hf, "resolve_precision", lambda req, dev, key: Choice(req, "fp32", "no native bf16"))
    assert decode_precision("auto", large, cpu) == ("fp32", "no native bf16")


def test_stop_candidates_flag_the_tokens_a_stop_string_can_end_in(engine):
    from posttrain.rollout.hf_engine import stop_candidates

    tok = engine.tokenizer
    vocab = len(tok) + 3  # a model's padded embedding rows past the tokenizer's vocabulary
    flags = stop_candidates(tok, ["\n", "ab+"], vocab)
    texts = [tok.decode([i], skip_special_tokens=True) for i in range(len(tok))]
    want = [not t or "\ufffd" in t or "\n" in t or "+" in t for t in texts]
    assert flags.tolist() == want + [True] * 3 and 0 < sum(want) < len(tok) // 2
    assert stop_candidates(tok, ["Answer: "], vocab) is None  # a trailing space: every row is decoded


def test_stop_tables_are_built_once_per_tokenizer_content(tiny_model_dir, monkeypatch):
    import posttrain.rollout.hf_engine as hf
    from posttrain.models.load import load_tokenizer

    built = []

    def table(tok, stop, vocab):
        built.append(len(tok))
        return torch.ones(vocab, dtype=torch.bool)

    monkeypatch.setattr(hf, "_STOP_TABLES", {})
    monkeypatch.setattr(hf, "stop_candidates", table)
    first, second = load_tokenizer(tiny_model_dir), load_tokenizer(tiny_model_dir)  # two loads, one content
    for tok in (first, second, first):
        hf.shared_stop_candidates(tok, ["\n"], 300)
    assert built == [len(first)]
    hf.shared_stop_candidates(first, ["\n\n"], 300)  # another stop set
    second.add_tokens(["<extra>"])  # another vocabulary
    hf.shared_stop_candidates(second, ["\n"], 300)
    assert built == [len(first), len(first), len(first) + 1]


@pytest.mark.parametrize("kind", ["one character", "across tokens"])
def test_stop_strings_checked_on_candidate_rows_only_stop_where_a_full_check_does(engine, kind, monkeypatch):
    """The same completions (tokens, text, finish) whether only the rows whose new token can end a
    stop string are decoded, or every row at every step; the stop strings come from a free sample,
    so they are hit: a single character, or text spanning a token boundary."""
    import posttrain.rollout.hf_engine as hf

    tok = engine.tokenizer
    free = engine.generate(PROMPTS[:1], SamplingParams(n=1, temperature=1.2, max_new_tokens=24, seed=5))[0]
    pieces = [tok.decode([t]) for t in free.token_ids]
    if kind == "one character":
        stop = [next(p[-1] for p in pieces[4:] if p.strip() and p.isascii())]
    else:
        k = next(i for i in range(4, len(pieces) - 1) if pieces[i].strip() and pieces[i + 1].strip())
        stop = [pieces[k][-1] + pieces[k + 1][:1]]
    replay = SamplingParams(n=1, temperature=1.2, max_new_tokens=24, seed=5, stop=stop)  # hits the stop
    params = SamplingParams(n=4, temperature=1.2, max_new_tokens=24, seed=5, stop=stop)

    def run():
        out = engine.generate(PROMPTS[:1], replay) + engine.generate(PROMPTS, params)
        engine._stop_rows.clear()
        hf._STOP_TABLES.clear()  # the process-wide copy too: the next run builds its table again
        return [(c.token_ids, c.text, c.finish_reason) for c in out]

    fast = run()
    monkeypatch.setattr(hf, "stop_candidates", lambda *a: None)
    assert fast == run()
    assert fast[0][2] == "stop" and stop[0] in fast[0][1] and len(fast[0][0]) < len(free.token_ids)
