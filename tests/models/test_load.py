"""Loading errors, dtype/device resolution and the save_hf_folder round trip."""

from __future__ import annotations

import json
import logging

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from posttrain.errors import BackendUnavailable, ConfigError, ModelError
from posttrain.models.load import (
    count_parameters,
    load_model,
    load_tokenizer,
    resolve_dtype,
    save_hf_folder,
)
from posttrain.models.tokenizer import DEFAULT_TEMPLATE


def test_missing_path_is_model_error(tmp_path):
    with pytest.raises(ModelError) as info:
        load_model(tmp_path / "nope", device="cpu")
    assert str(tmp_path / "nope") in str(info.value) and "config.json" in str(info.value)


def test_folder_without_config_is_model_error(tmp_path):
    (tmp_path / "weights.bin").write_bytes(b"")
    with pytest.raises(ModelError, match="no config.json"):
        load_model(tmp_path, device="cpu")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-CUDA message")
def test_cuda_without_cuda_is_backend_unavailable(tmp_path):
    with pytest.raises(BackendUnavailable, match="CUDA"):
        load_model(tmp_path, device="cuda")


def test_resolve_dtype():
    assert resolve_dtype("auto", "cpu") is torch.float32
    assert resolve_dtype("auto", "cuda") is torch.bfloat16
    assert resolve_dtype("bf16", "cpu") is torch.bfloat16
    with pytest.raises(ConfigError, match="float32"):
        resolve_dtype("float8", "cpu")


def test_count_parameters_counts_tied_once(tiny_model):
    trainable, total = count_parameters(tiny_model)
    cfg = tiny_model.config
    embed = cfg.vocab_size * cfg.hidden_size  # tied: lm_head shares it
    assert total == embed + sum(p.numel() for p in tiny_model.model.layers.parameters()) + cfg.hidden_size
    tiny_model.model.embed_tokens.weight.requires_grad_(False)
    assert count_parameters(tiny_model) == (trainable - embed, total)


def test_save_reload_same_logits(tiny_model, tokenizer, tmp_path):
    out = save_hf_folder(
        tiny_model, tokenizer, tmp_path / "m", generation_config={"do_sample": True, "temperature": 0.7}
    )
    assert (out / "model.safetensors").is_file()
    reloaded = AutoModelForCausalLM.from_pretrained(out).eval()
    ids = torch.tensor([tokenizer.encode("Compute 11 + 16")])
    with torch.no_grad():
        assert torch.equal(tiny_model(ids).logits, reloaded(ids).logits)
    assert AutoTokenizer.from_pretrained(out).chat_template == DEFAULT_TEMPLATE
    gen = json.loads((out / "generation_config.json").read_text())
    assert gen["temperature"] == 0.7 and gen["pad_token_id"] == tokenizer.pad_token_id
    assert reloaded.config.pad_token_id == tokenizer.pad_token_id
    # Through our loader too: dtype auto on CPU is fp32, pad synced.
    model = load_model(out, device="cpu")
    assert model.dtype == torch.float32 and model.config.pad_token_id == tokenizer.pad_token_id


def test_save_replaces_existing_folder_atomically(tiny_model, tokenizer, tmp_path):
    out = tmp_path / "m"
    out.mkdir()
    (out / "stale.txt").write_text("old")
    save_hf_folder(tiny_model, tokenizer, out)
    assert not (out / "stale.txt").exists() and (out / "config.json").is_file()
    assert [p.name for p in tmp_path.iterdir()] == ["m"]  # no temp or backup folders left


def test_failed_save_keeps_old_folder(tiny_model, tokenizer, tmp_path):
    out = tmp_path / "m"
    out.mkdir()
    (out / "keep.txt").write_text("old")
    with pytest.raises(ConfigError, match="temperature"):
        save_hf_folder(tiny_model, tokenizer, out, generation_config={"temperature": 0.7})
    assert (out / "keep.txt").read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["m"]


def test_load_tokenizer_sets_pad_from_eos(tokenizer, tmp_path, caplog):
    tokenizer.save_pretrained(tmp_path)
    cfg_path = tmp_path / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg.pop("pad_token")
    cfg_path.write_text(json.dumps(cfg))
    with caplog.at_level(logging.WARNING):
        loaded = load_tokenizer(tmp_path, padding_side="left")
    assert loaded.pad_token == loaded.eos_token == "<|im_end|>"
    assert loaded.padding_side == "left"
    assert "no pad token" in caplog.text
