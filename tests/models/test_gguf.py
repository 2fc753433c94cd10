"""GGUF import: a tiny llama written with gguf.GGUFWriter round-trips to a plain HF folder."""

from __future__ import annotations

import json
import os
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

from posttrain.errors import ModelError
from posttrain.models.gguf import import_gguf, import_gguf_report
from posttrain.models.tokenizer import DEFAULT_TEMPLATE, MARKER_TOKENS, SPECIAL_TOKENS

HEADS, KV_HEADS = 4, 2


def llama_permute(weight: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's Q/K row permutation (convert_hf_to_gguf.LlamaModel.permute), which the loader undoes."""
    return (
        weight.reshape(n_head, 2, weight.shape[0] // n_head // 2, *weight.shape[1:])
        .swapaxes(1, 2)
        .reshape(weight.shape)
    )


def gguf_tensors(model: LlamaForCausalLM) -> dict[str, np.ndarray]:
    """HF llama weights under llama.cpp names (tied embeddings: no `output.weight`)."""
    sd = {k: v.detach().numpy() for k, v in model.state_dict().items()}
    out = {
        "token_embd.weight": sd["model.embed_tokens.weight"],
        "output_norm.weight": sd["model.norm.weight"],
    }
    names = {
        "input_layernorm": "attn_norm", "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k",
        "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output", "post_attention_layernorm": "ffn_norm",
        "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down",
    }  # fmt: skip
    for i in range(model.config.num_hidden_layers):
        for hf, gg in names.items():
            w = sd[f"model.layers.{i}.{hf}.weight"]
            if gg == "attn_q":
                w = llama_permute(w, HEADS)
            elif gg == "attn_k":
                w = llama_permute(w, KV_HEADS)
            out[f"blk.{i}.{gg}.weight"] = w
    return out


def add_tokenizer(writer: gguf.GGUFWriter, tokenizer) -> None:
    """Our default tokenizer as GGUF `gpt2` (byte-level BPE) metadata with the qwen2 split."""
    spec = json.loads(tokenizer.backend_tokenizer.to_str())
    vocab = tokenizer.get_vocab()
    tokens = [t for t, _ in sorted(vocab.items(), key=lambda kv: kv[1])]
    types = [3 if t in SPECIAL_TOKENS else 4 if t in MARKER_TOKENS else 1 for t in tokens]
    merges = [m if isinstance(m, str) else " ".join(m) for m in spec["model"]["merges"]]
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("qwen2")
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(merges)
    writer.add_eos_token_id(tokenizer.eos_token_id)
    writer.add_pad_token_id(tokenizer.pad_token_id)
    writer.add_chat_template(DEFAULT_TEMPLATE)


def write_tiny_gguf(path: Path, tokenizer) -> LlamaForCausalLM:
    """Write a 2-layer llama GGUF (fp32 tensors) and return the HF model it was made from."""
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=HEADS, num_key_value_heads=KV_HEADS, max_position_embeddings=256,
        rms_norm_eps=1e-5, rope_theta=10000.0, tie_word_embeddings=True,
    )  # fmt: skip
    model = LlamaForCausalLM(config).eval()
    writer = gguf.GGUFWriter(path, arch="llama")
    writer.add_name("tiny-llama")
    writer.add_block_count(2)
    writer.add_context_length(256)
    writer.add_embedding_length(64)
    writer.add_feed_forward_length(128)
    writer.add_head_count(HEADS)
    writer.add_head_count_kv(KV_HEADS)
    writer.add_rope_dimension_count(64 // HEADS)
    writer.add_rope_freq_base(10000.0)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_vocab_size(len(tokenizer))
    writer.add_file_type(gguf.LlamaFileType.ALL_F32)
    add_tokenizer(writer, tokenizer)
    for name, tensor in gguf_tensors(model).items():
        writer.add_tensor(name, np.ascontiguousarray(tensor, dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return model


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory, tokenizer):
    path = tmp_path_factory.mktemp("gguf") / "tiny.gguf"
    return path, write_tiny_gguf(path, tokenizer)


def test_import_matches_source_model(tiny_gguf, tokenizer, tmp_path):
    path, source = tiny_gguf
    report = import_gguf_report(path, tmp_path / "hf")
    assert report.max_abs_diff is not None and report.max_abs_diff <= 1e-4
    model = AutoModelForCausalLM.from_pretrained(report.out_dir).eval()
    assert getattr(model.config, "quantization_config", None) is None
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()  # tied
    ids = torch.tensor([tokenizer.encode("Compute 11 + 16 = 27")])
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, source(ids).logits, atol=1e-5, rtol=1e-5)
    # The model is trainable: a backward pass reaches the weights.
    model.train()
    model(ids, labels=ids).loss.backward()
    assert model.model.layers[0].self_attn.q_proj.weight.grad is not None


def test_import_keeps_tokenizer_and_template(tiny_gguf, tokenizer, tmp_path):
    out = import_gguf(tiny_gguf[0], tmp_path / "hf", check=False)
    loaded = AutoTokenizer.from_pretrained(out)
    assert loaded.chat_template == DEFAULT_TEMPLATE
    assert loaded.eos_token == "<|im_end|>" and loaded.pad_token == "<|endoftext|>"
    assert loaded.model_max_length == 256  # bounded by the context length
    text = "<think>12 + 7 = 19</think> hello world"
    assert loaded.encode(text) == tokenizer.encode(text)


def test_missing_file(tmp_path):
    with pytest.raises(ModelError, match="not found"):
        import_gguf(tmp_path / "absent.gguf", tmp_path / "out")


def test_not_a_gguf(tmp_path):
    bogus = tmp_path / "model.gguf"
    bogus.write_bytes(b"PK\x03\x04 not gguf")
    with pytest.raises(ModelError, match="not a GGUF file"):
        import_gguf(bogus, tmp_path / "out")
    assert not (tmp_path / "out").exists()


SMOLLM2_GGUF = os.environ.get("POSTTRAIN_SMOLLM2_GGUF", "")


@pytest.mark.slow
@pytest.mark.skipif(
    not Path(SMOLLM2_GGUF).is_file(), reason="set POSTTRAIN_SMOLLM2_GGUF to the .gguf (~40 s)"
)
def test_smollm2_import(tmp_path):
    report = import_gguf_report(SMOLLM2_GGUF, tmp_path / "smol")
    assert report.max_abs_diff == 0.0 and 134e6 < report.parameters < 135e6
    assert "<|im_start|>" in AutoTokenizer.from_pretrained(report.out_dir).chat_template
