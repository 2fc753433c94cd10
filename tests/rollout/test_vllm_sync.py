"""Weight sync to rollout engines (`posttrain.rollout.weight_sync`), on CPU with a real PEFT-wrapped
tiny model: plain HF names exactly, merged LoRA equal to PEFT's own merge, adapter mode, buckets,
checksums; and the vLLM engine's bucketed `update_weights` loop into a plain HF model."""

from __future__ import annotations

import pytest
import torch

from posttrain.errors import BackendUnavailable
from posttrain.models.load import load_model
from posttrain.models.peft import PeftConfig, apply_peft
from posttrain.rollout.weight_sync import (
    SyncMismatch,
    adapter_state,
    buckets,
    checksum,
    hf_name,
    sync_state,
    verify,
)


@pytest.fixture
def lora_policy(tiny_model_dir):
    """The tiny model with LoRA on every linear layer, B made non-zero (as after training)."""
    model = apply_peft(load_model(tiny_model_dir), PeftConfig(method="lora", r=4, alpha=8))
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.05)
    return model


def test_hf_names():
    assert hf_name("base_model.model.model.layers.0.self_attn.q_proj.base_layer.weight") == (
        "model.layers.0.self_attn.q_proj.weight"
    )
    assert hf_name("base_model.model.model.layers.0.self_attn.q_proj.lora_A.default.weight") is None
    assert hf_name("base_model.model.lm_head.modules_to_save.default.weight") == "lm_head.weight"
    assert hf_name("base_model.model.lm_head.original_module.weight") is None
    assert hf_name("model.norm.weight") == "model.norm.weight"  # a plain model passes through


def test_merged_sync_has_the_plain_names_and_peft_merge_values(tiny_model_dir, lora_policy):
    plain = load_model(tiny_model_dir)
    before = {k: v.clone() for k, v in lora_policy.state_dict().items()}
    state = sync_state(lora_policy, "merged")
    assert list(state) == list(plain.state_dict())  # the same names, in the same order
    assert all(torch.equal(v, lora_policy.state_dict()[k]) for k, v in before.items())  # untouched
    q = "model.layers.0.self_attn.q_proj.weight"
    assert not torch.equal(state[q], plain.state_dict()[q])  # the adapter is merged in
    merged = apply_peft(load_model(tiny_model_dir), PeftConfig(method="lora", r=4, alpha=8))
    merged.load_state_dict(lora_policy.state_dict())
    reference = merged.merge_and_unload().state_dict()  # PEFT's own merge
    for k in state:
        torch.testing.assert_close(state[k], reference[k], rtol=0, atol=1e-6)
    plain.load_state_dict(state)  # strict: nothing missing, nothing unexpected
    ids = torch.tensor([[1, 5, 9, 14, 3]])
    torch.testing.assert_close(plain(ids).logits, lora_policy(input_ids=ids).logits, rtol=0, atol=1e-5)


def test_adapter_sync_sends_base_weights_and_the_adapter_apart(tiny_model_dir, lora_policy):
    plain = load_model(tiny_model_dir)
    state = sync_state(lora_policy, "adapter")
    assert list(state) == list(plain.state_dict())
    assert all(torch.equal(v, plain.state_dict()[k]) for k, v in state.items())  # base, not merged
    adapter = adapter_state(lora_policy)
    assert adapter and all(".lora_A." in k or ".lora_B." in k for k in adapter)
    assert "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight" in adapter  # PEFT's file naming


def test_ia3_cannot_be_merged(tiny_model_dir):
    from posttrain.errors import ModelError

    model = apply_peft(load_model(tiny_model_dir), PeftConfig(method="ia3"))
    with pytest.raises(ModelError, match="not IA3"):
        sync_state(model, "merged")


def test_buckets_by_bytes():
    t = lambda n: torch.zeros(n)  # noqa: E731  (4 bytes per element)
    state = {"a": t(10), "b": t(10), "c": t(30), "d": t(5), "e": t(100)}
    got = [[name for name, _ in b] for b in buckets(state, bucket_bytes=100)]
    assert got == [["a", "b"], ["c"], ["d"], ["e"]]  # 80 B; 120 B alone; 20 B (e would pass 100); 400 B alone
    got = [[name for name, _ in b] for b in buckets(state, bucket_bytes=10_000)]
    assert got == [["a", "b", "c", "d", "e"]]


def test_checksum_sees_one_ulp_and_verify_names_the_worker():
    state = {"w": torch.ones(3, 3), "b": torch.zeros(3)}
    same = {"b": torch.zeros(3), "w": torch.ones(3, 3)}
    assert checksum(state) == checksum(same)  # name order does not matter
    bumped = {"w": torch.ones(3, 3), "b": torch.tensor([0.0, 0.0, torch.finfo(torch.float32).tiny])}
    assert checksum(bumped) != checksum(state)
    assert checksum({"w": torch.ones(3, 3, dtype=torch.float64), "b": torch.zeros(3)}) != checksum(state)
    verify("abc", {"worker 0": "abc"}, 1)
    with pytest.raises(SyncMismatch, match="worker 1: xyz"):
        verify("abc", {"worker 0": "abc", "worker 1": "xyz"}, 4)


def test_vllm_update_weights_sends_plain_names_in_buckets(tiny_model_dir, lora_policy):
    """The engine's sync loop without vLLM: the receiving model is the plain HF model given
    vLLM's model interface, ``load_weights(iterable of (name, tensor))``; after the sync it must
    hold the merged policy exactly, and the tensors must have come in a few calls, not one each."""
    target, calls = load_model(tiny_model_dir), []

    def load_weights(weights):
        bucket = dict(weights)
        calls.append(list(bucket))
        result = target.load_state_dict(bucket, strict=False)
        assert not result.unexpected_keys, result.unexpected_keys  # a PEFT name would land here
        return set(bucket)

    target.load_weights = load_weights
    _bare_engine(target).update_weights(lora_policy)
    expected = sync_state(lora_policy)
    assert [n for call in calls for n in call] == list(expected)
    assert 1 < len(calls) < len(expected)  # buckets: more than one call, fewer than one per tensor
    assert checksum(target.state_dict()) == checksum(expected)


def test_vllm_unavailable_names_the_gpu_extra(monkeypatch):
    import sys

    from posttrain.rollout.vllm_engine import import_vllm

    monkeypatch.setitem(sys.modules, "vllm", None)
    with pytest.raises(BackendUnavailable, match=r"posttrain\[gpu\]"):
        import_vllm()


def _bare_engine(target, lora_sync="merged"):
    from posttrain.rollout.vllm_engine import VLLMEngine

    engine = VLLMEngine.__new__(VLLMEngine)  # no vLLM here: only the sync path is exercised
    engine._apply = lambda fn: fn(target)
    engine.lora_sync, engine.bucket_bytes, engine.probe_tol = lora_sync, 64 * 1024, None
    engine._reset, engine._base_sent, engine._syncs = lambda: None, False, 0
    return engine


def test_adapter_sync_needs_a_lora_policy(tiny_model_dir):
    from posttrain.errors import ConfigError

    plain = load_model(tiny_model_dir)
    with pytest.raises(ConfigError, match="peft.method=lora"):
        _bare_engine(plain, "adapter").update_weights(plain)


def test_recipe_lora_sync_reaches_the_vllm_engine(tiny_model_dir, tmp_path, monkeypatch):
    """rollout.lora_sync travels from the recipe to the vllm backend's factory (registered here as
    the HF engine, the reference backend, since vLLM cannot run on CPU)."""
    import sys
    from pathlib import Path

    from posttrain.rollout import engine as registry
    from posttrain.rollout.hf_engine import HFEngine
    from posttrain.train.rl import setup

    sys.path.insert(0, str(Path(__file__).parents[1] / "train"))
    from test_rl_trainer import recipe

    seen = {}

    def factory(model, tokenizer, **kwargs):
        seen.update(kwargs)
        return HFEngine(model, tokenizer)

    monkeypatch.setitem(registry.ENGINES, "vllm", factory)
    extra = ["rollout.backend=vllm", "rollout.lora_sync=adapter", "peft.method=lora"]
    s = setup(recipe(tiny_model_dir, tmp_path / "r", *extra))
    assert seen == {"lora_sync": "adapter"} and isinstance(s.engine, HFEngine)
