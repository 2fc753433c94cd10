"""Packed batches give the same per-token logits and summed NLL as unpacked samples.

Uses tiny Qwen2 / Llama models (random weights, float32, no dropout) with the
sdpa and eager attention implementations, and negative controls showing the
test can fail: cross-sample attention (positions not restarting), a forgotten
``use_cache=False``, and unmasked labels at sample starts.
"""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

from posttrain.data import collate
from posttrain.data.collate import PACKED_FORWARD_KWARGS, pack, packed_collate, verify_packed_attention
from posttrain.data.render import IGNORE_INDEX, render_chat
from posttrain.errors import ModelError

CONVERSATIONS = [
    ["Hi", "Hello there"],
    ["What is 2 + 3?", "5", "One more?", "Sure! It is 7"],
    ["Thanks", "ok"],
    ["What is the sum?", "Let me add 2 and 3 and 4", "Bye", "Bye!"],
    ["Hi there", "Hello"],
]


def _model(arch: str, attn: str):
    torch.manual_seed(0)
    kw = dict(
        vocab_size=64,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        attention_dropout=0.0,
        attn_implementation=attn,
        dtype=torch.float32,
    )
    model = Qwen2ForCausalLM(Qwen2Config(**kw)) if arch == "qwen2" else LlamaForCausalLM(LlamaConfig(**kw))
    return model.eval()


@pytest.fixture(scope="module")
def samples(chatml_tok):
    out = []
    for i, turns in enumerate(CONVERSATIONS):
        msgs = [{"role": "user" if j % 2 == 0 else "assistant", "content": t} for j, t in enumerate(turns)]
        # train_on="all" puts a target on every sample's first token, so label masking matters.
        out += render_chat(chatml_tok, msgs, train_on="assistant" if i % 2 else "all")
    assert chatml_tok.unk_token_id not in [t for s in out for t in s.input_ids]
    return out


def _token_nll(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Per-token NLL (B, T-1) of labels[:, 1:] under logits[:, :-1]; 0 where label is -100."""
    logp = torch.log_softmax(logits[:, :-1].float(), dim=-1)
    target = labels[:, 1:]
    nll = -logp.gather(-1, target.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return nll * (target != IGNORE_INDEX)


@torch.no_grad()
def _unpacked(model, samples):
    logits, nll = [], 0.0
    for s in samples:
        ids = torch.tensor([s.input_ids])
        out = model(ids, use_cache=False).logits
        logits.append(out[0])
        nll += _token_nll(out, torch.tensor([s.labels])).sum()
    return logits, nll


@torch.no_grad()
def _packed_nll(model, batch, **kw):
    logits = model(input_ids=batch["input_ids"], position_ids=batch.get("position_ids"), **kw).logits
    return logits, _token_nll(logits, batch["labels"]).sum()


@pytest.mark.parametrize("arch", ["qwen2", "llama"])
@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_packed_equals_unpacked(arch, attn, samples):
    model = _model(arch, attn)
    rows = pack(samples, 48, seed=0)
    assert len(rows) < len(samples) and any(len(r.seq_lens) > 1 for r in rows)
    batch = packed_collate(rows, pad_id=1)
    ref_logits, ref_nll = _unpacked(model, samples)

    logits, nll = _packed_nll(model, batch, **PACKED_FORWARD_KWARGS)
    torch.testing.assert_close(nll, ref_nll, atol=1e-4, rtol=1e-5)
    for b, row in enumerate(rows):
        start = 0
        for n, i in zip(row.seq_lens, row.sample_ids, strict=True):
            torch.testing.assert_close(logits[b, start : start + n], ref_logits[i], atol=1e-4, rtol=1e-4)
            start += n

    # Negative control 1: positions that do not restart = one causal sequence per row.
    flat = dict(batch, position_ids=torch.arange(batch["input_ids"].shape[1]).expand_as(batch["input_ids"]))
    assert abs(_packed_nll(model, flat, **PACKED_FORWARD_KWARGS)[1] - ref_nll) > 1e-2
    # Negative control 2: with the config default use_cache=True transformers skips
    # packed-sequence detection and samples attend to each other.
    assert abs(_packed_nll(model, batch)[1] - ref_nll) > 1e-2
    # Negative control 3: without -100 at sample starts, each first token is
    # "predicted" from the previous sample: extra loss terms.
    unmasked = dict(batch, labels=batch["labels"].clone())
    for b, row in enumerate(rows):
        start = 0
        for n, i in zip(row.seq_lens, row.sample_ids, strict=True):
            unmasked["labels"][b, start] = samples[i].labels[0]
            start += n
    assert _packed_nll(model, unmasked, **PACKED_FORWARD_KWARGS)[1] > ref_nll + 1e-2


def test_verify_packed_attention(monkeypatch):
    model = _model("qwen2", "sdpa").train()
    verify_packed_attention(model)
    assert model.training  # the mode is restored
    monkeypatch.setattr(collate, "PACKED_FORWARD_KWARGS", {})  # forgetting use_cache=False leaks
    with pytest.raises(ModelError, match="packed samples attend to each other"):
        verify_packed_attention(model)
