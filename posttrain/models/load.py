"""Load and save Hugging Face causal LMs and tokenizers, with user-facing errors.

Every stage reads and writes plain HF folders (safetensors + config.json + tokenizer with its
chat template + generation_config.json), so any stage can be swapped for another tool.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    GenerationConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from posttrain.errors import BackendUnavailable, ConfigError, ModelError
from posttrain.models import fused_ops
from posttrain.models.attention import ATTENTION

log = logging.getLogger(__name__)

DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
}
MODEL_FOLDER_HINT = (
    "a model folder must contain config.json and the weights (model.safetensors or "
    "pytorch_model.bin, possibly sharded), usually with tokenizer files beside them"
)


def resolve_device(device: str = "auto") -> torch.device:
    """`auto` -> cuda if available else cpu; a CUDA device without CUDA is `BackendUnavailable`."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except RuntimeError as err:
        raise ConfigError(
            f"unknown device {device!r}", where="device", fix="use auto, cpu, cuda or cuda:N"
        ) from err
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise BackendUnavailable(
            f"device {device!r} was requested but this torch build sees no CUDA GPU",
            where="device",
            fix="use device=auto or device=cpu, or run on a machine with an NVIDIA GPU and a CUDA build of torch",
        )
    return resolved


def resolve_dtype(name: str, device: str | torch.device = "cpu") -> torch.dtype:
    """Map a dtype name to a torch dtype; `auto` = fp32 on CPU (bf16/fp16 matmuls are slow
    there), bf16 on CUDA."""
    if name == "auto":
        return torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32
    if name not in DTYPES:
        raise ConfigError(
            f"unknown dtype {name!r}", where="dtype", fix=f"use one of: auto, {', '.join(DTYPES)}"
        )
    return DTYPES[name]


def count_parameters(model: torch.nn.Module) -> tuple[int, int]:
    """Return `(trainable, total)` parameter counts (shared tensors counted once)."""
    params = list({id(p): p for p in model.parameters()}.values())
    trainable = sum(p.numel() for p in params if p.requires_grad)
    return trainable, sum(p.numel() for p in params)


def _is_local(path: str | os.PathLike) -> bool:
    """A string that names the filesystem (absolute, ./, ~, or existing) rather than a hub id."""
    text = str(path)
    return os.path.exists(text) or text.startswith((".", "/", "~")) or text.count("/") > 1


def check_model_source(
    path: str | os.PathLike, gguf_file: str | None = None, need_config: bool = True
) -> None:
    """Raise ModelError unless `path` is a model folder (or a hub id, tried later)."""
    folder = Path(path).expanduser()
    if not _is_local(path):
        return
    if not folder.exists():
        raise ModelError("model path does not exist", where=str(path), fix=MODEL_FOLDER_HINT)
    if not folder.is_dir():
        raise ModelError("model path is not a folder", where=str(path), fix=MODEL_FOLDER_HINT)
    if need_config and gguf_file is None and not (folder / "config.json").is_file():
        raise ModelError(
            "folder has no config.json, so it is not a Hugging Face model folder",
            where=str(path),
            fix=MODEL_FOLDER_HINT + "; for a .gguf file pass gguf_file= or import it with import_gguf",
        )


def load_tokenizer(
    path: str | os.PathLike, padding_side: str = "right", gguf_file: str | None = None
) -> PreTrainedTokenizerBase:
    """Load a tokenizer; if it has no pad token, use eos as pad (with a logged warning)."""
    if padding_side not in ("left", "right"):
        raise ConfigError(f"padding_side must be left or right, got {padding_side!r}", where="padding_side")
    check_model_source(path, gguf_file, need_config=False)
    files = ("tokenizer.json", "tokenizer.model", "vocab.json")
    if _is_local(path) and gguf_file is None and not any((Path(path) / f).is_file() for f in files):
        # transformers would build an empty (1-token) tokenizer from config.json alone
        raise ModelError("the folder has no tokenizer files (tokenizer.json, tokenizer.model or vocab.json)",
                         where=str(path), fix="copy the tokenizer files of the base model into the folder")  # fmt: skip
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(path), padding_side=padding_side, gguf_file=gguf_file)
    except (OSError, ValueError) as err:
        raise ModelError(
            f"cannot load a tokenizer: {err}",
            where=str(path),
            fix="the folder needs tokenizer.json (or the model's tokenizer files) and tokenizer_config.json",
        ) from err
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise ModelError("tokenizer has neither a pad nor an eos token", where=str(path))
        log.warning("tokenizer at %s has no pad token; using eos %r as pad", path, tokenizer.eos_token)
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def sync_special_tokens(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> None:
    """Copy the tokenizer's pad (and eos, when the config has none) ids into the model config
    and generation config, so batched generation pads and stops with the tokenizer's ids."""
    model.config.pad_token_id = tokenizer.pad_token_id
    if getattr(model.config, "eos_token_id", None) is None:
        model.config.eos_token_id = tokenizer.eos_token_id
    gen = getattr(model, "generation_config", None)
    if gen is not None:
        gen.pad_token_id = tokenizer.pad_token_id
        if gen.eos_token_id is None:
            gen.eos_token_id = tokenizer.eos_token_id


def load_model(
    path: str | os.PathLike,
    dtype: str = "auto",
    device: str = "auto",
    gguf_file: str | None = None,
    tokenizer: PreTrainedTokenizerBase | None = None,
) -> PreTrainedModel:
    """Load a causal LM from a local folder (or a hub id where a network exists).

    dtype `auto` = fp32 on CPU, bf16 on CUDA. The pad token id is synced with `tokenizer`
    (loaded from `path` when not given and the folder has one). On CPU the attention is
    `posttrain.models.attention` (SDPA, or matmuls where those are faster), and Llama-family
    RMSNorms and SiLU MLPs run fused kernels (`posttrain.models.fused_ops`).
    """
    target = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, target)
    check_model_source(path, gguf_file)
    attn = {"attn_implementation": ATTENTION} if target.type == "cpu" else {}  # registered on import
    try:
        model = AutoModelForCausalLM.from_pretrained(
            str(path), dtype=torch_dtype, gguf_file=gguf_file, **attn
        )
    except (OSError, ValueError, KeyError) as err:
        hint = MODEL_FOLDER_HINT + ("" if _is_local(path) else "; a hub id needs network access")
        raise ModelError(f"cannot load the model: {err}", where=str(path), fix=hint) from err
    except SafetensorError as err:  # a truncated or corrupt weights file
        raise ModelError(f"cannot read the weights (*.safetensors): {err}", where=str(path),
                         fix="the file is truncated or corrupt: copy or export the model again") from err  # fmt: skip
    model.to(target)
    if target.type == "cpu":
        fused_ops.install(model)  # fused RMSNorm and SiLU * up (C++ kernels), where they built
    if tokenizer is None:
        try:
            tokenizer = load_tokenizer(path, gguf_file=gguf_file)
        except ModelError:
            log.warning("no tokenizer found at %s; pad_token_id left as in the config", path)
    if tokenizer is not None:
        sync_special_tokens(model, tokenizer)
    return model


def _generation_config(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, overrides: dict[str, Any] | None
) -> GenerationConfig:
    """The model's generation config with the tokenizer's eos/pad ids, then `overrides`."""
    base = getattr(model, "generation_config", None)
    gen = GenerationConfig.from_dict(base.to_dict()) if base is not None else GenerationConfig()
    gen.pad_token_id = tokenizer.pad_token_id
    if gen.eos_token_id is None:
        gen.eos_token_id = tokenizer.eos_token_id
    for key, value in (overrides or {}).items():
        if not hasattr(gen, key):
            raise ConfigError(f"unknown generation setting {key!r}", where=f"generation_config.{key}")
        setattr(gen, key, value)
    try:
        gen.validate(strict=True)
    except ValueError as err:
        raise ConfigError(f"invalid generation settings: {err}", where="generation_config") from err
    return gen


def _umask_permissions(folder: Path) -> None:
    """Give `folder` and its files the modes a plain mkdir/open would (mkdtemp makes 0700)."""
    umask = os.umask(0)
    os.umask(umask)
    folder.chmod(0o777 & ~umask)
    for item in folder.rglob("*"):
        item.chmod((0o777 if item.is_dir() else 0o666) & ~umask)


def replace_dir(staged: Path, out_dir: Path) -> None:
    """Move the complete folder `staged` to `out_dir`, replacing an existing one.

    POSIX `rename` cannot replace a non-empty directory, so the old folder is first renamed
    aside (same parent, so both renames are atomic) and deleted only after the swap.
    """
    if out_dir.exists() and not out_dir.is_dir():
        raise ModelError("output path exists and is not a folder", where=str(out_dir))
    old = None
    if out_dir.exists():
        old = Path(tempfile.mkdtemp(dir=out_dir.parent, prefix=f".{out_dir.name}.old-"))
        os.replace(out_dir, old / out_dir.name)
    os.replace(staged, out_dir)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def save_hf_folder(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    out_dir: str | os.PathLike,
    generation_config: dict[str, Any] | None = None,
) -> Path:
    """Write a plain HF folder that `AutoModelForCausalLM.from_pretrained` loads unchanged.

    Contents: model.safetensors (+ config.json), the tokenizer (with its chat template) and
    generation_config.json (model's, with tokenizer eos/pad, then `generation_config`
    overrides). Written to a temp folder beside `out_dir`, then renamed into place, so a
    crash never leaves a half-written `out_dir`.
    """
    out = Path(out_dir).expanduser().resolve()
    out.parent.mkdir(parents=True, exist_ok=True)
    staged = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.tmp-"))
    try:
        sync_special_tokens(model, tokenizer)
        model.save_pretrained(staged)
        tokenizer.save_pretrained(staged)
        _generation_config(model, tokenizer, generation_config).save_pretrained(staged)
        _umask_permissions(staged)
        replace_dir(staged, out)
    except BaseException:
        shutil.rmtree(staged, ignore_errors=True)
        raise
    return out
