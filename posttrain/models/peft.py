"""Parameter-efficient fine-tuning: one typed config, wrapping through the `peft` library.

Methods (`PeftConfig.method`):
- full: every parameter trains.
- lora: `h = W0 x + (alpha/r) B A x`, A (r, d_in) random, B (d_out, r) zero at init; merged on
  export as `W' = W0 + (alpha/r) B A`, so inference has no extra latency.
- qlora: LoRA on a base loaded in 4-bit NF4 (bitsandbytes, CUDA only; `load_peft_model`).
- bitfit: train only the bias vectors (our few lines; peft has none).
- prefix: trainable key/value prefixes of `num_virtual_tokens` in every layer (cannot merge).
- prompt: `num_virtual_tokens` trainable input embeddings prepended (cannot merge).
- ia3: learned vectors rescale keys, values and feed-forward inputs (merged on export).
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from posttrain.errors import BackendUnavailable, ConfigError
from posttrain.models.load import replace_dir, resolve_device, save_hf_folder

Method = Literal["full", "lora", "qlora", "bitfit", "prefix", "prompt", "ia3"]
METHODS: tuple[str, ...] = ("full", "lora", "qlora", "bitfit", "prefix", "prompt", "ia3")
MERGEABLE = ("lora", "qlora", "ia3")


@dataclass
class PeftConfig:
    """Which parameters train, and how the result is exported."""

    method: Method = "full"
    """full | lora | qlora | bitfit | prefix | prompt | ia3 (see the module docstring)."""
    r: int = 8
    """LoRA rank r of the update B A (lora, qlora)."""
    alpha: int = 16
    """LoRA scale numerator: the update is multiplied by alpha / r (lora, qlora)."""
    dropout: float = 0.0
    """Dropout on the LoRA input x (lora, qlora)."""
    target_modules: list[str] | str = "all-linear"
    """Module names (or a peft regex) to adapt; "all-linear" = every linear but the LM head
    (for ia3: peft's per-architecture default, keys/values/down-projection)."""
    num_virtual_tokens: int = 16
    """Number of virtual tokens learned (prefix, prompt)."""
    merge_on_export: bool = True
    """Merge LoRA/IA3 into the base weights on export (a plain HF folder) instead of saving
    the adapter alone."""

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ConfigError(
                f"unknown PEFT method {self.method!r}",
                where="peft.method",
                fix=f"use one of: {', '.join(METHODS)}",
            )
        checks = {"r": self.r > 0, "alpha": self.alpha > 0, "num_virtual_tokens": self.num_virtual_tokens > 0}
        checks["dropout"] = 0.0 <= self.dropout < 1.0
        for name, ok in checks.items():
            if not ok:
                raise ConfigError(f"invalid {name}={getattr(self, name)!r}", where=f"peft.{name}")


def check_qlora_backend() -> None:
    """Raise BackendUnavailable unless CUDA and bitsandbytes are present (checked before any
    heavy import)."""
    fix = "install the GPU extra (pip install 'posttrain[gpu]') on a CUDA machine, or use method=lora"
    if not torch.cuda.is_available():
        raise BackendUnavailable(
            "qlora needs a CUDA GPU (bitsandbytes 4-bit NF4)", where="peft.method", fix=fix
        )
    if importlib.util.find_spec("bitsandbytes") is None:
        raise BackendUnavailable(
            "qlora needs bitsandbytes, which is not installed", where="peft.method", fix=fix
        )


def nf4_quantization_config() -> Any:
    """The QLoRA recipe: 4-bit NF4 weights, double quantisation, bf16 compute."""
    check_qlora_backend()
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.bfloat16,
    )


def load_peft_model(path: str | os.PathLike, cfg: PeftConfig, dtype: str = "auto", device: str = "auto"):
    """Load the base model as `cfg` needs (4-bit NF4 for qlora) and wrap it with `apply_peft`."""
    from posttrain.models.load import check_model_source, load_model

    if cfg.method != "qlora":
        return apply_peft(load_model(path, dtype=dtype, device=device), cfg)
    quantization = nf4_quantization_config()
    check_model_source(path)
    from transformers import AutoModelForCausalLM

    target = resolve_device("cuda" if device == "auto" else device)
    model = AutoModelForCausalLM.from_pretrained(
        str(path), quantization_config=quantization, device_map={"": target}, dtype=torch.bfloat16
    )
    return apply_peft(model, cfg)


def apply_bitfit(model: PreTrainedModel) -> PreTrainedModel:
    """Freeze everything, then unfreeze parameters whose name ends with "bias" (BitFit)."""
    names = [name for name, _ in model.named_parameters() if name.endswith("bias")]
    if not names:
        raise ConfigError(
            f"{type(model).__name__} has no bias parameters, so BitFit has nothing to train",
            where="peft.method",
            fix="use lora (Llama-style models have no biases; Qwen2 has q/k/v biases)",
        )
    for name, param in model.named_parameters():
        param.requires_grad_(name.endswith("bias"))
    return model


def build_peft_config(cfg: PeftConfig) -> Any:
    """The `peft` library config for a lora / qlora / prefix / prompt / ia3 method."""
    import peft

    if cfg.method in ("lora", "qlora"):
        return peft.LoraConfig(
            r=cfg.r,
            lora_alpha=cfg.alpha,
            lora_dropout=cfg.dropout,
            target_modules=cfg.target_modules,
            task_type=peft.TaskType.CAUSAL_LM,
        )
    if cfg.method == "ia3":
        # None lets peft pick the paper's modules for this architecture (k, v, down_proj).
        targets = None if cfg.target_modules == "all-linear" else cfg.target_modules
        return peft.IA3Config(target_modules=targets, task_type=peft.TaskType.CAUSAL_LM)
    if cfg.method == "prefix":
        return peft.PrefixTuningConfig(
            num_virtual_tokens=cfg.num_virtual_tokens, task_type=peft.TaskType.CAUSAL_LM
        )
    return peft.PromptTuningConfig(
        num_virtual_tokens=cfg.num_virtual_tokens, task_type=peft.TaskType.CAUSAL_LM
    )


def apply_peft(model: PreTrainedModel, cfg: PeftConfig):
    """Return the model to train for `cfg.method`, with `requires_grad` set accordingly.

    full: unchanged, all parameters trainable. bitfit: biases only. Others: a `peft.PeftModel`
    whose base is frozen. qlora expects a base already loaded in 4-bit (`load_peft_model`).
    """
    if cfg.method == "full":
        for param in model.parameters():
            param.requires_grad_(True)
        return model
    if cfg.method == "bitfit":
        return apply_bitfit(model)
    if cfg.method == "qlora":
        check_qlora_backend()
        if not getattr(model, "is_loaded_in_4bit", False):
            raise ConfigError(
                "qlora needs the base model loaded in 4-bit NF4",
                where="peft.method",
                fix="load it with posttrain.models.peft.load_peft_model(path, cfg)",
            )
        from peft import prepare_model_for_kbit_training

        model = prepare_model_for_kbit_training(model)
    import peft

    try:
        return peft.get_peft_model(model, build_peft_config(cfg))
    except ValueError as err:
        raise ConfigError(f"peft cannot wrap this model: {err}", where="peft.target_modules") from err


def save_adapter_folder(model: Any, tokenizer: PreTrainedTokenizerBase, out_dir: str | os.PathLike) -> Path:
    """Save a peft adapter (adapter_config.json + adapter_model.safetensors) and the tokenizer,
    staged beside `out_dir` and renamed into place."""
    out = Path(out_dir).expanduser().resolve()
    out.parent.mkdir(parents=True, exist_ok=True)
    staged = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.tmp-"))
    try:
        model.save_pretrained(staged)
        tokenizer.save_pretrained(staged)
        replace_dir(staged, out)
    except BaseException:
        shutil.rmtree(staged, ignore_errors=True)
        raise
    return out


def export_model(
    model: Any, tokenizer: PreTrainedTokenizerBase, out_dir: str | os.PathLike, cfg: PeftConfig
) -> Path:
    """Write the trained model to `out_dir` in the form its method allows.

    - lora / ia3 (merge_on_export): `merge_and_unload` folds the adapter into the base
      (`W' = W0 + (alpha/r) B A` for LoRA), then a plain HF folder via `save_hf_folder`.
    - qlora (merge_on_export): merged into the NF4 base, then dequantised to a plain model;
      the merged update passes through NF4 rounding, so it is close to, not equal to, W0 + BA.
    - prefix / prompt, or merge_on_export=False: the adapter alone (`save_pretrained`) plus
      the tokenizer. Virtual tokens are extra attention inputs, not a weight delta, so prefix
      and prompt tuning cannot be merged; load with `peft.AutoPeftModelForCausalLM`.
    - full / bitfit: a plain HF folder.
    Merging modifies `model` in place.
    """
    if cfg.method in ("full", "bitfit"):
        return save_hf_folder(model, tokenizer, out_dir)
    if cfg.method not in MERGEABLE or not cfg.merge_on_export:
        return save_adapter_folder(model, tokenizer, out_dir)
    merged = model.merge_and_unload()
    if cfg.method == "qlora":
        merged = merged.dequantize()
    return save_hf_folder(merged, tokenizer, out_dir)
