"""PEFT wrapping and export: LoRA merge equivalence, BitFit, prefix/prompt/IA3, QLoRA errors."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

from posttrain.errors import BackendUnavailable, ConfigError
from posttrain.models.load import count_parameters
from posttrain.models.peft import PeftConfig, apply_peft, export_model


def batch(tokenizer) -> torch.Tensor:
    return torch.tensor([tokenizer.encode("Compute 11 + 16 + 0 + 14 = 41")])


def randomise_lora_b(model) -> None:
    """peft initialises B = 0, which makes merged == unmerged trivially; make B non-zero."""
    torch.manual_seed(1)
    for name, param in model.named_parameters():
        if "lora_B" in name:
            param.data.normal_(std=0.5)


def test_lora_merge_equals_unmerged(tiny_model, tokenizer, tmp_path):
    cfg = PeftConfig(method="lora", r=4, alpha=8)
    base_q = tiny_model.model.layers[0].self_attn.q_proj.weight.detach().clone()
    model = apply_peft(tiny_model, cfg)
    randomise_lora_b(model)
    ids = batch(tokenizer)
    with torch.no_grad():
        adapted = model(ids).logits
    layer = model.base_model.model.model.layers[0].self_attn.q_proj
    delta = (cfg.alpha / cfg.r) * layer.lora_B["default"].weight @ layer.lora_A["default"].weight
    out = export_model(model, tokenizer, tmp_path / "merged", cfg)
    merged = AutoModelForCausalLM.from_pretrained(out).eval()
    assert not any("lora" in name for name, _ in merged.named_parameters())
    # W' = W0 + (alpha/r) B A, by hand, on one layer.
    torch.testing.assert_close(merged.model.layers[0].self_attn.q_proj.weight, base_q + delta)
    with torch.no_grad():
        torch.testing.assert_close(merged(ids).logits, adapted, atol=1e-5, rtol=1e-4)
    assert delta.abs().max() > 1e-3  # the adapter really changed the weights


def test_lora_freezes_base(tiny_model):
    model = apply_peft(tiny_model, PeftConfig(method="lora", r=2))
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    # all-linear: q, k, v, o, gate, up, down in each of 2 layers, A and B each.
    assert len(trainable) == 2 * 7 * 2


def test_bitfit_trains_only_biases(tiny_model, tokenizer):
    model = apply_peft(tiny_model, PeftConfig(method="bitfit"))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    trainable, total = count_parameters(model)
    assert 0 < trainable < total
    optim = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    ids = batch(tokenizer)
    model.train()
    model(ids, labels=ids).loss.backward()
    optim.step()
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert changed and all(n.endswith("bias") for n in changed)
    assert {n for n in before if n.endswith("bias")} == changed


def test_bitfit_without_biases_is_config_error():
    config = LlamaConfig(vocab_size=50, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=2)  # fmt: skip
    with pytest.raises(ConfigError, match="no bias"):
        apply_peft(LlamaForCausalLM(config), PeftConfig(method="bitfit"))


@pytest.mark.parametrize("method", ["prefix", "prompt", "ia3"])
def test_wrap_forward_backward(tiny_model, tokenizer, method, tmp_path):
    cfg = PeftConfig(method=method, num_virtual_tokens=4)
    model = apply_peft(tiny_model, cfg)
    trainable, total = count_parameters(model)
    assert 0 < trainable < total / 10
    ids = batch(tokenizer)
    model.train()
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert torch.isfinite(loss) and all(g is not None for g in grads)
    assert all(p.grad is None for p in model.parameters() if not p.requires_grad)
    out = export_model(model, tokenizer, tmp_path / "out", cfg)
    if method == "ia3":
        assert (out / "model.safetensors").is_file()  # merged into a plain folder
    else:
        assert (out / "adapter_config.json").is_file() and (out / "tokenizer.json").is_file()


def test_ia3_merge_equals_unmerged(tiny_model, tokenizer, tmp_path):
    cfg = PeftConfig(method="ia3")
    model = apply_peft(tiny_model, cfg)
    torch.manual_seed(2)
    for name, param in model.named_parameters():
        if "ia3_l" in name:
            param.data.uniform_(0.5, 1.5)  # peft initialises the scales to 1 (identity)
    ids = batch(tokenizer)
    with torch.no_grad():
        adapted = model(ids).logits
    merged = AutoModelForCausalLM.from_pretrained(export_model(model, tokenizer, tmp_path / "m", cfg)).eval()
    with torch.no_grad():
        torch.testing.assert_close(merged(ids).logits, adapted, atol=1e-5, rtol=1e-4)


def test_lora_without_merge_saves_adapter(tiny_model, tokenizer, tmp_path):
    cfg = PeftConfig(method="lora", merge_on_export=False)
    out = export_model(apply_peft(tiny_model, cfg), tokenizer, tmp_path / "a", cfg)
    assert (out / "adapter_model.safetensors").is_file() and not (out / "model.safetensors").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU error")
def test_qlora_on_cpu_is_backend_unavailable(tiny_model):
    with pytest.raises(BackendUnavailable, match="CUDA") as info:
        apply_peft(tiny_model, PeftConfig(method="qlora"))
    assert "[gpu]" in str(info.value)


def test_config_validation():
    with pytest.raises(ConfigError, match="full, lora, qlora"):
        PeftConfig(method="adapterdrop")
    with pytest.raises(ConfigError, match="peft.r"):
        PeftConfig(method="lora", r=0)
