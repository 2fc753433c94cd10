"""Fused RMSNorm and SiLU * up for training (`posttrain.models.fused_ops`): the same logits and
gradients as HF's modules in fp32, no further from fp32 than HF under bf16 autocast, the output
dtypes each norm must have, which modules are swapped, and that swapped models copy, save and
load like plain ones."""

from __future__ import annotations

import copy

import pytest
import torch
from transformers import (
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
)

from posttrain.models import cpu_kernels, fused_ops
from posttrain.models.load import load_model

SHAPE = dict(
    vocab_size=300, hidden_size=64, intermediate_size=160, num_hidden_layers=2, num_attention_heads=4,
    num_key_value_heads=2,
)  # fmt: skip
FAMILIES = {
    "llama": (LlamaConfig, LlamaForCausalLM),
    "qwen2": (Qwen2Config, Qwen2ForCausalLM),
    "mistral": (MistralConfig, MistralForCausalLM),
}


def build(family: str, **extra):
    torch.manual_seed(0)
    config_cls, model_cls = FAMILIES[family]
    return model_cls(config_cls(**(SHAPE | extra))).train()


def logits_and_grads(model, ids: torch.Tensor, autocast: bool):
    model.zero_grad(set_to_none=True)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        logits = model(input_ids=ids).logits.float()
    (logits.square().mean() + logits.logsumexp(-1).mean()).backward()
    return logits.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


def grad_error(grads: dict, ref: dict) -> float:
    """The largest gradient difference, relative to each parameter's largest reference entry."""
    return max(((grads[n] - ref[n]).abs().max() / ref[n].abs().max()).item() for n in ref)


@pytest.fixture(scope="module", autouse=True)
def kernels_built():
    assert cpu_kernels.load() is not None, f"the kernels must build here: {cpu_kernels.reason}"


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_fp32_logits_and_gradients_equal_hf(family):
    plain = build(family)
    fused = copy.deepcopy(plain)
    assert fused_ops.install(fused) == 2 * 2 + 1 + 2  # two norms a layer, the final norm, two MLPs
    ids = torch.randint(0, 300, (3, 17), generator=torch.Generator().manual_seed(1))
    ref_logits, ref_grads = logits_and_grads(plain, ids, autocast=False)
    logits, grads = logits_and_grads(fused, ids, autocast=False)
    torch.testing.assert_close(logits, ref_logits, atol=1e-5, rtol=1e-5)
    assert grad_error(grads, ref_grads) < 1e-5


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_bf16_autocast_is_as_close_to_fp32_as_hf(family):
    plain = build(family)
    fused = copy.deepcopy(plain)
    fused_ops.install(fused)
    ids = torch.randint(0, 300, (4, 33), generator=torch.Generator().manual_seed(2))
    exact_logits, exact_grads = logits_and_grads(plain, ids, autocast=False)
    hf_logits, hf_grads = logits_and_grads(plain, ids, autocast=True)
    logits, grads = logits_and_grads(fused, ids, autocast=True)
    hf_err = (hf_logits - exact_logits).abs().max().item()
    assert hf_err > 1e-4  # bf16 really ran
    assert (logits - exact_logits).abs().max().item() <= 1.5 * hf_err
    assert grad_error(grads, exact_grads) <= 1.5 * grad_error(hf_grads, exact_grads) + 1e-3


def test_layer_norms_emit_bf16_under_autocast_and_the_final_norm_fp32():
    model = build("llama")
    fused_ops.install(model)
    layer, final = model.model.layers[0].input_layernorm, model.model.norm
    x = torch.randn(2, 5, 64)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert layer(x).dtype == torch.bfloat16  # what the projections' autocast casts to anyway
        assert final(x).dtype == torch.float32  # heads and losses read it
    assert layer(x).dtype == torch.float32
    ref = layer.weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + layer.variance_epsilon))
    torch.testing.assert_close(layer(x), ref, atol=1e-6, rtol=1e-5)
    half = x.bfloat16()  # a bf16 input: h rounded to bf16 before the fp32 weight, as HF does
    expected = (
        layer.weight
        * (half.float() * torch.rsqrt(half.float().pow(2).mean(-1, keepdim=True) + 1e-6)).bfloat16()
    )
    torch.testing.assert_close(layer(half), expected, atol=1e-6, rtol=1e-5)


def test_only_llama_family_norms_and_silu_mlps_are_swapped():
    gelu = build("llama", hidden_act="gelu")
    assert fused_ops.install(gelu) == 5  # the norms only
    assert type(gelu.model.layers[0].mlp).__name__ == "LlamaMLP"
    model = build("llama")
    assert fused_ops.install(model) == 7 and fused_ops.install(model) == 0  # idempotent
    assert isinstance(model.model.layers[0].mlp, type(build("llama").model.layers[0].mlp))


def test_swapped_models_copy_save_and_load_like_plain_ones(tmp_path):
    model = build("qwen2").eval()
    before = dict(model.state_dict())
    fused_ops.install(model)
    assert model.state_dict().keys() == before.keys()
    twin = copy.deepcopy(model)
    with torch.no_grad():
        twin.model.layers[0].mlp.up_proj.weight.mul_(2)  # the copy runs its own weights
        for p in twin.model.norm.parameters():
            p.mul_(3)
    ids = torch.randint(0, 300, (2, 9), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        assert not torch.allclose(model(input_ids=ids).logits, twin(input_ids=ids).logits)
        model.save_pretrained(tmp_path)
        loaded = load_model(tmp_path, dtype="float32", device="cpu")
        assert type(loaded.model.norm).__name__ == "FusedQwen2RMSNorm"
        torch.testing.assert_close(loaded(input_ids=ids).logits, model(input_ids=ids).logits)


def test_swapped_models_pickle_within_and_across_processes(monkeypatch):
    import pickle

    model = build("mistral").eval()
    fused_ops.install(model)
    ids = torch.randint(0, 300, (2, 7), generator=torch.Generator().manual_seed(4))
    blob = pickle.dumps(model)
    for name in ("FusedMistralRMSNorm", "FusedMistralMLP"):  # a fresh process has not built them yet
        monkeypatch.delitem(vars(fused_ops), name)
    monkeypatch.setattr(fused_ops, "_SWAPPED", {})
    back = pickle.loads(blob)
    assert (
        type(back.model.norm).__name__ == "FusedMistralRMSNorm"
        and back.model.norm._posttrain_emits_autocast is False
    )
    with torch.no_grad():
        assert torch.equal(back(input_ids=ids).logits, model(input_ids=ids).logits)
    with pytest.raises(AttributeError):
        fused_ops.FusedGemmaRMSNorm  # noqa: B018


def test_nothing_is_swapped_with_the_kernels_off(monkeypatch):
    monkeypatch.setattr(cpu_kernels, "_module", None)
    monkeypatch.setattr(cpu_kernels, "reason", None)
    monkeypatch.setenv(cpu_kernels.ENV_SWITCH, "0")
    model = build("llama")
    assert fused_ops.install(model) == 0
    assert type(model.model.norm).__name__ == "LlamaRMSNorm"
