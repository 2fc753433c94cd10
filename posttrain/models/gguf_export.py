"""Write a Hugging Face causal LM as a GGUF file (llama.cpp format), the inverse of `gguf.py`.

What is written follows llama.cpp's `convert_hf_to_gguf.py` for the architectures we support:
- Llama and Mistral as GGUF arch `llama`; Qwen2 as `qwen2`. Anything else is a ModelError.
- tensors renamed with `gguf.get_tensor_name_map` (`model.layers.0.self_attn.q_proj.weight` ->
  `blk.0.attn_q.weight`); for `llama` the Q and K rows are permuted from HF's rotate-half
  layout to llama.cpp's interleaved RoPE layout (`llama_permute`, K with the KV-head count);
  Qwen2 keeps HF's layout (llama.cpp runs it with NEOX RoPE). A tied LM head writes no
  `output.weight` (readers re-tie it).
- tensor types: 1-D tensors and norms stay F32; 2-D weights are F32, F16, or Q8_0 (blocks of
  32 values with one fp16 scale, `gguf.quants.quantize`); a row length not divisible by 32
  falls back to F16 as llama.cpp does.
- hyper-parameters: context length, widths, block count, head counts, RoPE base and dimension,
  RMS-norm epsilon, vocabulary size, file type. RoPE scaling (Llama 3.1 `llama3`, YaRN, ...)
  is refused rather than silently dropped.
- tokenizer: byte-level BPE only (`tokenizer.ggml.model = gpt2`): the vocabulary in id order,
  merges, token types (special added tokens CONTROL, other added tokens USER_DEFINED), bos /
  eos / pad / unk ids, whether bos/eos are added, and the chat template. The pre-tokenizer
  (`tokenizer.ggml.pre`) is read off `tokenizer.json`: isolated digits + GPT-2 regex
  (our default tokenizer, SmolLM) -> `smollm`; plain GPT-2 regex -> `gpt-2`; the Qwen2 and
  Llama-3 split regexes -> `qwen2` / `llama-bpe`. SentencePiece tokenizers are refused.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from posttrain.errors import ModelError

# HF `config.model_type` -> GGUF `general.architecture` (llama.cpp converts Mistral as llama).
ARCHITECTURES: dict[str, str] = {"llama": "llama", "mistral": "llama", "qwen2": "qwen2"}
GGUF_TYPES: tuple[str, ...] = ("f32", "f16", "q8_0")
QK8_0 = 32  # values per Q8_0 block
LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)


def gguf_arch(config: Any) -> str:
    """The GGUF architecture for an HF config, or a ModelError naming the supported ones."""
    model_type = getattr(config, "model_type", None)
    if model_type not in ARCHITECTURES:
        names = ", ".join(sorted(ARCHITECTURES))
        raise ModelError(
            f"GGUF export does not support architecture {model_type!r}",
            where="model_dir",
            fix=f"export a model of a supported architecture ({names}), or use format=hf",
        )
    return ARCHITECTURES[model_type]


def llama_permute(weight: np.ndarray, n_head: int) -> np.ndarray:
    """HF rotate-half Q/K rows -> llama.cpp interleaved rows: per head, row (i, half h) of
    the (2, d/2) split moves to position (i, h) of a (d/2, 2) split. (out, in) -> (out, in)."""
    rows = weight.shape[0]
    return (
        weight.reshape(n_head, 2, rows // n_head // 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)
    )


def head_dim(config: Any) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def check_rope(config: Any) -> float:
    """The RoPE base; a ModelError for any RoPE scaling (it would be dropped silently)."""
    params = dict(getattr(config, "rope_parameters", None) or {})
    scaling = getattr(config, "rope_scaling", None) or {}
    rope_type = params.get("rope_type", scaling.get("rope_type", scaling.get("type", "default")))
    if rope_type not in ("default", None):
        raise ModelError(
            f"GGUF export does not support RoPE scaling {rope_type!r}",
            where="model_dir/config.json:rope_parameters",
            fix="export with format=hf, or convert with llama.cpp's convert_hf_to_gguf.py",
        )
    return float(params.get("rope_theta", getattr(config, "rope_theta", 10000.0)))


def check_config(config: Any, arch: str) -> None:
    """Refuse configs whose GGUF form readers would rebuild wrongly."""
    if arch == "qwen2" and head_dim(config) != config.hidden_size // config.num_attention_heads:
        raise ModelError(
            "qwen2 GGUF cannot state a head_dim other than hidden_size / num_attention_heads",
            where="model_dir/config.json:head_dim",
            fix="export with format=hf",
        )
    if getattr(config, "use_sliding_window", False) or (
        config.model_type == "mistral"
        and (getattr(config, "sliding_window", None) or 1 << 62) < config.max_position_embeddings
    ):
        raise ModelError(
            "GGUF export does not carry sliding-window attention",
            where="model_dir/config.json:sliding_window",
            fix="set sliding_window to null if the model does not need it, or export with format=hf",
        )


def state_tensors(model: PreTrainedModel, arch: str) -> Iterator[tuple[str, np.ndarray]]:
    """(GGUF name, fp32 array) for every weight; Q/K permuted for `llama`; tied head skipped."""
    import gguf

    config = model.config
    names = gguf.get_tensor_name_map(getattr(gguf.MODEL_ARCH, arch.upper()), config.num_hidden_layers)
    tied = bool(getattr(config, "tie_word_embeddings", False))
    for hf_name, tensor in model.state_dict().items():
        if tied and hf_name == "lm_head.weight":
            continue
        name = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if name is None:
            raise ModelError(
                f"no GGUF name for tensor {hf_name!r}", where="model_dir", fix="export with format=hf"
            )
        data = tensor.detach().to("cpu", torch.float32).numpy()
        if arch == "llama" and ".attn_q." in name:
            data = llama_permute(data, config.num_attention_heads)
        elif arch == "llama" and ".attn_k." in name:
            data = llama_permute(data, config.num_key_value_heads)
        yield name, np.ascontiguousarray(data)


def encode_tensor(name: str, data: np.ndarray, gguf_type: str) -> tuple[np.ndarray, Any]:
    """`(array, GGMLQuantizationType)` of one tensor for the file type `gguf_type`."""
    from gguf import GGMLQuantizationType as Q
    from gguf.quants import quantize

    if data.ndim <= 1 or name.endswith("_norm.weight") or gguf_type == "f32":
        return data.astype(np.float32), Q.F32
    if gguf_type == "q8_0" and data.shape[-1] % QK8_0 == 0:
        return quantize(data, Q.Q8_0), Q.Q8_0
    return data.astype(np.float16), Q.F16


def pre_tokenizer_name(tokenizer: PreTrainedTokenizerBase) -> str:
    """llama.cpp's `tokenizer.ggml.pre` for this tokenizer's pre-tokenizer (see module doc)."""
    from transformers.models.qwen2.tokenization_qwen2 import PRETOKENIZE_REGEX as QWEN2_SPLIT

    spec = json.loads(tokenizer.backend_tokenizer.to_str())
    if spec["model"]["type"] != "BPE" or spec.get("decoder", {}).get("type") != "ByteLevel":
        raise ModelError(
            "GGUF export supports byte-level BPE tokenizers only (Qwen2, Llama 3, SmolLM, the default)",
            where="model_dir/tokenizer.json",
            fix="export with format=hf, or convert with llama.cpp's convert_hf_to_gguf.py",
        )
    pre = spec.get("pre_tokenizer") or {}
    parts = pre.get("pretokenizers", [pre]) if pre.get("type") == "Sequence" else [pre]
    kinds = [p.get("type") for p in parts]
    if kinds == ["ByteLevel"] and parts[0].get("use_regex", True):
        return "gpt-2"
    if (
        kinds == ["Digits", "ByteLevel"]
        and parts[0].get("individual_digits")
        and parts[1].get("use_regex", True)
    ):
        return "smollm"
    if kinds == ["Split", "ByteLevel"]:
        pattern = parts[0].get("pattern", {}).get("Regex")
        known = {QWEN2_SPLIT: "qwen2", LLAMA3_SPLIT: "llama-bpe"}
        if pattern in known:
            return known[pattern]
    raise ModelError(
        f"GGUF export does not know this tokenizer's pre-tokenizer ({json.dumps(pre)[:200]})",
        where="model_dir/tokenizer.json:pre_tokenizer",
        fix="known: GPT-2 regex, isolated digits + GPT-2 regex, the Qwen2 and Llama-3 splits; or use format=hf",
    )


def tokenizer_metadata(tokenizer: PreTrainedTokenizerBase, vocab_size: int) -> dict[str, Any]:
    """Everything a GGUF reader needs to rebuild the tokenizer (token list padded with unused
    `[PADi]` entries up to the model's `vocab_size`)."""
    import gguf

    spec = json.loads(tokenizer.backend_tokenizer.to_str())
    by_id = {i: t for t, i in tokenizer.get_vocab().items()}
    if sorted(by_id) != list(range(len(by_id))) or len(by_id) > vocab_size:
        raise ModelError(
            f"tokenizer ids are not 0..{len(by_id) - 1} within the model's vocab_size {vocab_size}",
            where="model_dir/tokenizer.json",
        )
    added = tokenizer.added_tokens_decoder
    tokens, types = [], []
    for i in range(vocab_size):
        if i not in by_id:
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
        elif i in added:
            tokens.append(by_id[i])
            types.append(gguf.TokenType.CONTROL if added[i].special else gguf.TokenType.USER_DEFINED)
        else:
            tokens.append(by_id[i])
            types.append(gguf.TokenType.NORMAL)
    probe = tokenizer("a", add_special_tokens=True)["input_ids"]
    bare = tokenizer("a", add_special_tokens=False)["input_ids"]
    return {
        "pre": pre_tokenizer_name(tokenizer),
        "tokens": tokens,
        "types": [int(t) for t in types],
        "merges": [m if isinstance(m, str) else " ".join(m) for m in spec["model"]["merges"]],
        "ids": {
            "bos": tokenizer.bos_token_id,
            "eos": tokenizer.eos_token_id,
            "pad": tokenizer.pad_token_id,
            "unk": tokenizer.unk_token_id,
        },
        "add_bos": len(probe) > len(bare) and probe[0] == tokenizer.bos_token_id,
        "add_eos": len(probe) > len(bare) and probe[-1] == tokenizer.eos_token_id,
        "chat_template": tokenizer.chat_template if isinstance(tokenizer.chat_template, str) else None,
    }


def add_tokenizer(writer: Any, meta: dict[str, Any]) -> None:
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(meta["pre"])
    writer.add_token_list(meta["tokens"])
    writer.add_token_types(meta["types"])
    writer.add_token_merges(meta["merges"])
    adders = {
        "bos": writer.add_bos_token_id,
        "eos": writer.add_eos_token_id,
        "pad": writer.add_pad_token_id,
        "unk": writer.add_unk_token_id,
    }
    for key, token_id in meta["ids"].items():
        if token_id is not None:
            adders[key](token_id)
    writer.add_add_bos_token(meta["add_bos"])
    writer.add_add_eos_token(meta["add_eos"])
    if meta["chat_template"]:
        writer.add_chat_template(meta["chat_template"])


def add_hparams(writer: Any, config: Any, arch: str, gguf_type: str) -> None:
    import gguf

    file_types = {
        "f32": gguf.LlamaFileType.ALL_F32,
        "f16": gguf.LlamaFileType.MOSTLY_F16,
        "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0,
    }
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_rope_freq_base(check_rope(config))
    writer.add_rope_dimension_count(head_dim(config))
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_vocab_size(config.vocab_size)
    writer.add_file_type(file_types[gguf_type])
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)


def write_gguf(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, path: str | Path, gguf_type: str, name: str
) -> Path:
    """Write `model` + `tokenizer` as one GGUF file of type `gguf_type` (f32, f16, q8_0)."""
    import gguf

    if gguf_type not in GGUF_TYPES:
        raise ModelError(
            f"unknown GGUF type {gguf_type!r}", where="gguf_types", fix=f"use {', '.join(GGUF_TYPES)}"
        )
    arch = gguf_arch(model.config)
    check_config(model.config, arch)
    meta = tokenizer_metadata(tokenizer, model.config.vocab_size)
    path = Path(path)
    writer = gguf.GGUFWriter(path, arch=arch)
    try:
        writer.add_name(name)
        add_hparams(writer, model.config, arch, gguf_type)
        add_tokenizer(writer, meta)
        for tensor_name, data in state_tensors(model, arch):
            array, qtype = encode_tensor(tensor_name, data, gguf_type)
            writer.add_tensor(tensor_name, array, raw_dtype=qtype)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
    finally:
        writer.close()
    return path
