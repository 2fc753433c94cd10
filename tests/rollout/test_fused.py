"""The fused Llama-family forward of the rollout engine: the same logits as HF's forward (Qwen2,
Llama, Mistral; left padding, prefill then decode; LoRA), its snapshot refresh, its refusals, and
the two-level inverse-CDF draw."""

from __future__ import annotations

from collections import Counter

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM, MistralConfig, MistralForCausalLM

from posttrain.models import cpu_kernels
from posttrain.models.load import load_model, load_tokenizer
from posttrain.rollout import fused as fused_module
from posttrain.rollout.fused import FusedLM, Linear, Unsupported, can_pack, unsupported
from posttrain.rollout.hf_engine import HFEngine, draw, new_cache
from posttrain.rollout.sampling import SamplingParams

TOL = 1e-4  # fp32: fused projections and oneDNN's packed kernels only reorder the sums


def llama(**extra):
    torch.manual_seed(0)
    shape = dict(
        vocab_size=300, hidden_size=64, intermediate_size=160, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, tie_word_embeddings=False, attention_bias=True,
    )  # fmt: skip
    return LlamaForCausalLM(LlamaConfig(**(shape | extra))).eval()


def mistral():
    torch.manual_seed(1)
    cfg = MistralConfig(
        vocab_size=300, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=1, sliding_window=None,
    )  # fmt: skip
    return MistralForCausalLM(cfg).eval()


@pytest.fixture(scope="module")
def qwen2(tiny_model_dir):
    return load_model(tiny_model_dir, dtype="float32", device="cpu")


def padded_batch(vocab: int, lengths: list[int], seed: int = 0):
    """Left-padded ids (R, P), the padding mask and position ids from its cumsum."""
    gen = torch.Generator().manual_seed(seed)
    width = max(lengths)
    ids = torch.randint(3, vocab, (len(lengths), width), generator=gen)
    mask = torch.zeros((len(lengths), width), dtype=torch.long)
    for i, n in enumerate(lengths):
        mask[i, width - n :] = 1
    ids = ids.masked_fill(mask == 0, 0)
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    return ids, mask, pos


def fused_logits(model, ids, mask, pos, new: torch.Tensor, dtype=torch.float32, kernels=None, wrap=None):
    """Prefill ``ids`` then decode ``new`` (R, T) one column at a time through FusedLM: the logits
    after the prefill and after each decoded token, (T + 1, R, V). ``wrap``: replaces the
    snapshot's kernels module with ``wrap(module)``."""
    fused = FusedLM(model, dtype, kernels=kernels)
    if wrap is not None:
        fused.kernels = wrap(fused.kernels)
    cache = new_cache(model, ids.shape[1] + new.shape[1])
    keys = torch.cat([mask, mask.new_ones(new.shape)], dim=1).bool()
    out = [fused.forward(ids, pos, keys, cache)]
    nxt = pos[:, -1] + 1
    for t in range(new.shape[1]):
        out.append(fused.forward(new[:, t : t + 1], (nxt + t)[:, None], keys, cache))
    return torch.stack(out)


def hf_logits(model, ids, mask, pos, new: torch.Tensor):
    """The same positions' logits from one full HF forward over prompt + new tokens."""
    full = torch.cat([ids, new], dim=1)
    attn = torch.cat([mask, mask.new_ones(new.shape)], dim=1)
    positions = torch.cat([pos, pos[:, -1:] + 1 + torch.arange(new.shape[1])], dim=1)
    with torch.no_grad():
        logits = model(input_ids=full, attention_mask=attn, position_ids=positions).logits
    width = ids.shape[1]
    return logits[:, width - 1 :].transpose(0, 1)


@pytest.mark.parametrize("which", ["qwen2", "llama", "mistral"])
def test_fused_forward_equals_hf_with_left_padding(which, qwen2):
    model = {"qwen2": lambda: qwen2, "llama": llama, "mistral": mistral}[which]()
    vocab = model.config.vocab_size
    ids, mask, pos = padded_batch(vocab, [7, 3, 5])
    new = torch.randint(3, vocab, (3, 4), generator=torch.Generator().manual_seed(1))
    got = fused_logits(model, ids, mask, pos, new)
    ref = hf_logits(model, ids, mask, pos, new)
    assert got.shape == ref.shape
    assert (got - ref).abs().max() < TOL


class Counting:
    """A kernels module whose calls are counted by name."""

    def __init__(self, module):
        self.module, self.calls = module, Counter()

    def __getattr__(self, name):
        fn = getattr(self.module, name)

        def counted(*args):
            self.calls[name] += 1
            return fn(*args)

        return counted


@pytest.mark.parametrize(
    "attend_max,vectorized",
    [(0, False), (1 << 30, False), (0, None)],
    ids=["pytorch-attention", "portable-kernel-attention", "vectorized-kernel-attention"],
)
def test_cpu_kernels_give_the_pytorch_ops_logits(qwen2, monkeypatch, attend_max, vectorized):
    """The portable kernel attends below ATTEND_KERNEL_MAX; the AVX-512 one (where the CPU has it:
    vectorized=None asks the built module) at every length."""
    monkeypatch.setattr(fused_module, "ATTEND_KERNEL_MAX", attend_max)
    ids, mask, pos = padded_batch(qwen2.config.vocab_size, [7, 3, 5])
    new = torch.randint(3, qwen2.config.vocab_size, (3, 4), generator=torch.Generator().manual_seed(5))
    counting: list[Counting] = []

    def wrap(module):
        counting.append(Counting(module))
        if vectorized is not None:
            counting[-1].decode_attention_vectorized = lambda d: vectorized
        return counting[-1]

    got = fused_logits(qwen2, ids, mask, pos, new, kernels=True, wrap=wrap)
    plain = fused_logits(qwen2, ids, mask, pos, new, kernels=False)
    assert (got - plain).abs().max() < 1e-5
    layers, calls = qwen2.config.num_hidden_layers, counting[0].calls
    assert calls["rope_kv_"] == 4 * layers  # every decode step, none in the prefill
    head_dim = qwen2.config.hidden_size // qwen2.config.num_attention_heads
    uses_kernel = attend_max > 0 or (
        vectorized is None and cpu_kernels.load().decode_attention_vectorized(head_dim)
    )
    assert calls["decode_attention"] == (4 * layers if uses_kernel else 0)
    assert calls["add_rms_norm_"] == 5 * (2 * layers + 1) and calls["silu_mul"] == 5 * layers
    ref = hf_logits(qwen2, ids, mask, pos, new)
    half = fused_logits(qwen2, ids, mask, pos, new, dtype=torch.bfloat16, kernels=True)
    assert 1e-3 < (half - ref).abs().max() < 0.3  # bf16 storage, fp32 arithmetic


def test_fused_forward_merges_lora():
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(llama(), LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"))
    with torch.no_grad():  # B starts at zero: make the adapters change the outputs
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.2)
    ids, mask, pos = padded_batch(300, [6, 4])
    new = torch.randint(3, 300, (2, 3), generator=torch.Generator().manual_seed(2))
    with model.disable_adapter():
        base = hf_logits(model, ids, mask, pos, new)
    ref = hf_logits(model, ids, mask, pos, new)
    assert (ref - base).abs().max() > 0.1  # the adapters matter
    assert (fused_logits(model, ids, mask, pos, new) - ref).abs().max() < TOL


def test_bf16_snapshot_stays_near_fp32(qwen2):
    ids, mask, pos = padded_batch(qwen2.config.vocab_size, [6, 6, 2])
    new = torch.randint(3, qwen2.config.vocab_size, (3, 3), generator=torch.Generator().manual_seed(3))
    ref = hf_logits(qwen2, ids, mask, pos, new)
    got = fused_logits(qwen2, ids, mask, pos, new, dtype=torch.bfloat16)
    diff = (got - ref).abs().max().item()
    assert 1e-3 < diff < 0.3, diff  # bf16 weights really ran, close to fp32


def test_outer_autocast_does_not_change_the_snapshot_numbers(qwen2):
    ids, mask, pos = padded_batch(qwen2.config.vocab_size, [5, 3])
    new = torch.randint(3, qwen2.config.vocab_size, (2, 2), generator=torch.Generator().manual_seed(4))
    plain = fused_logits(qwen2, ids, mask, pos, new)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        under = fused_logits(qwen2, ids, mask, pos, new)
    assert torch.equal(plain, under)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_packed_linear_keeps_only_the_packed_copy(dtype):
    """The snapshot held each packed weight twice (plain and reordered): 574 -> 317 MiB for SmolLM2."""
    if not can_pack(dtype):
        pytest.skip(f"oneDNN cannot pack {dtype} here")
    torch.manual_seed(0)
    w, b, x = torch.randn(1024, 512).to(dtype), torch.randn(1024).to(dtype), torch.randn(3, 512).to(dtype)
    lin = Linear(w, b, pack=True)
    assert lin.weight_t is None and lin.packed is not None
    tol = 1e-4 if dtype == torch.float32 else 0.1
    torch.testing.assert_close(
        lin(x).float(), torch.nn.functional.linear(x, w, b).float(), atol=tol, rtol=0.02
    )
    small = Linear(w[:8, :6], b[:8], pack=True)  # too small to pack: kept plain, as (in, out)
    assert small.packed is None and small.weight_t.shape == (6, 8)
    torch.testing.assert_close(
        small(x[:, None, :6]).float(),
        torch.nn.functional.linear(x[:, None, :6], w[:8, :6], b[:8]).float(),
        atol=tol,
        rtol=0.02,
    )


def test_unsupported_models_fall_back_to_hf_forward(tiny_model_dir):
    from transformers import GPT2Config, GPT2LMHeadModel

    tok = load_tokenizer(tiny_model_dir)
    gpt2 = GPT2LMHeadModel(GPT2Config(vocab_size=len(tok), n_positions=64, n_embd=32, n_layer=1, n_head=2))
    assert "model_type 'gpt2'" in unsupported(gpt2)
    with pytest.raises(Unsupported, match="gpt2"):
        FusedLM(gpt2, torch.float32)
    silu_free = llama(hidden_act="gelu")
    assert "hidden_act" in unsupported(silu_free)
    engine = HFEngine(gpt2.eval(), tok)
    out = engine.generate(["Compute 3 + 4"], SamplingParams(temperature=0.0, max_new_tokens=4))
    assert len(out[0].token_ids) == 4 and "gpt2" in engine.fused_reason
    sliding = MistralForCausalLM(
        MistralConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=1, sliding_window=4)
    ).eval()  # fmt: skip
    engine = HFEngine(sliding, tok)
    engine.generate(["Hi"], SamplingParams(temperature=0.0, max_new_tokens=2))
    assert "sliding window" in engine.fused_reason


def test_snapshot_follows_in_place_weight_changes(tiny_model_dir):
    """An optimizer step changes the shared module in place: the engine notices (version counters)
    and rebuilds its snapshot, even without update_weights."""
    tok = load_tokenizer(tiny_model_dir)
    model = load_model(tiny_model_dir, dtype="float32", device="cpu", tokenizer=tok)
    engine = HFEngine(model, tok)
    greedy = SamplingParams(temperature=0.0, max_new_tokens=8)
    first = engine._decoder()
    before = engine.generate(["Compute 3 + 4"], greedy)[0]
    assert engine._decoder() is first and not first.stale()
    opt = torch.optim.SGD(model.parameters(), lr=1.0)
    model(**tok(["Compute 3 + 4"], return_tensors="pt")).logits.sum().backward()
    opt.step()
    assert first.stale() and engine._decoder() is not first
    after = engine.generate(["Compute 3 + 4"], greedy)[0]
    reference = HFEngine(model, tok, fused=False).generate(["Compute 3 + 4"], greedy)[0]
    assert after.token_ids == reference.token_ids != before.token_ids


@pytest.mark.parametrize("vocab,block", [(7, 3), (300, 256), (1000, 64)])
def test_draw_frequencies_match_the_weights(vocab, block):
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(vocab, generator=gen) * 2
    logits[::5] = float("-inf")  # zero-weight tokens, some at block edges
    weights = torch.softmax(logits, -1) * 3.0  # unnormalised
    n = 60_000
    tok = draw(weights.expand(n, vocab).contiguous(), gen, block=block)
    freq = tok.bincount(minlength=vocab).float() / n
    assert freq[::5].sum() == 0  # never a zero-weight token
    p = weights / weights.sum()
    assert (freq - p).abs().max() < 5 * (p.max() / n) ** 0.5  # within 5 standard errors


def test_draw_lands_on_single_tokens_at_the_edges():
    gen = torch.Generator().manual_seed(0)
    for vocab, index in ((600, 0), (600, 599), (600, 255), (600, 256), (513, 512)):
        weights = torch.zeros(50, vocab)
        weights[:, index] = 1e-30  # tiny mass is still the whole distribution
        assert (draw(weights, gen) == index).all()


def test_nucleus_over_candidates_equals_the_full_sort():
    from posttrain.rollout.hf_engine import nucleus

    def full_sort(logits, top_p):
        values, order = torch.sort(logits, dim=-1, descending=True)
        probs = torch.softmax(values, -1)
        drop = probs.cumsum(-1) - probs > top_p
        drop[:, 0] = False
        return logits.scatter(1, order, values.masked_fill(drop, float("-inf")))

    gen = torch.Generator().manual_seed(0)
    for scale, top_p, within in ((10.0, 0.9, True), (10.0, 0.5, True), (0.3, 0.95, False)):
        logits = torch.randn(8, 5000, generator=gen) * scale
        mass = torch.softmax(logits, -1).topk(64).values.sum(-1)
        assert bool((mass > top_p).all()) is within  # peaked rows: the 64 candidates; flat: full sort
        got = nucleus(logits, top_p, candidates=64)
        assert torch.equal(got, full_sort(logits, top_p))
        kept = torch.isfinite(got).sum(-1)
        assert (kept >= 1).all() and (kept < 5000).all()


def test_rope_table_gives_the_rotary_modules_values_and_grows(qwen2):
    """The (cos, signed sin) table equals the rotary module's own output at every position, past
    its first size too; a length-dependent RoPE type (dynamic) is computed at every call."""
    fused = FusedLM(qwen2, torch.float32, kernels=False)
    for positions in (torch.tensor([[0, 5, 17]]), torch.tensor([[3], [700]]), torch.arange(600).view(2, 300)):
        cos, sin = fused.rope(positions)
        ref_cos, ref_sin = qwen2.model.rotary_emb(torch.empty(0), positions)
        half = ref_sin.shape[-1] // 2
        assert torch.equal(cos, ref_cos)
        assert torch.equal(sin, torch.cat((-ref_sin[..., :half], ref_sin[..., half:]), dim=-1))
    assert fused.rope_table[0].shape[0] >= 701
    dynamic = FusedLM(llama(rope_scaling={"rope_type": "dynamic", "factor": 2.0}), torch.float32)
    assert dynamic.rope_table is None
