"""Import a GGUF checkpoint (llama.cpp format) as a plain, trainable Hugging Face folder.

transformers loads a `.gguf` with `from_pretrained(dir, gguf_file=...)`, but the result carries
a GGUF quantizer that marks it not trainable and not serialisable. The import therefore:
1. loads the file fully dequantized to fp32 (`GgufConfig(dequantize=True)`, so no packed
   matmul kernels are used even where they exist);
2. rebuilds a plain model from the same config minus `quantization_config`, copies the state
   dict in and re-ties the embeddings;
3. optionally checks both give the same logits on a short prompt (max |diff| <= 1e-4);
4. saves model + tokenizer (with the file's chat template) + generation config via
   `save_hf_folder`.
"""

from __future__ import annotations

import copy
import logging
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    GgufConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from posttrain.errors import ModelError
from posttrain.models.load import save_hf_folder, sync_special_tokens

log = logging.getLogger(__name__)

GGUF_MAGIC = b"GGUF"
CHECK_PROMPT = "The capital of France is Paris. 12 + 7 = 19."
CHECK_TOLERANCE = 1e-4


@dataclass
class ImportReport:
    """What `import_gguf_report` did: where the folder is and how faithful and fast it was."""

    out_dir: Path
    max_abs_diff: float | None  # None when the logit check was skipped
    seconds: float
    parameters: int


def check_gguf_file(gguf_path: str | Path) -> Path:
    """Return the resolved path, or raise ModelError for a missing file or a non-GGUF one."""
    path = Path(gguf_path).expanduser().resolve()
    if not path.is_file():
        raise ModelError("GGUF file not found", where=str(gguf_path), fix="pass the path of a .gguf file")
    with path.open("rb") as handle:
        magic = handle.read(4)
    if magic != GGUF_MAGIC:
        raise ModelError(
            f"not a GGUF file (starts with {magic!r}, expected {GGUF_MAGIC!r})",
            where=str(gguf_path),
            fix="pass a llama.cpp .gguf file; for a Hugging Face folder use load_model instead",
        )
    return path


def load_gguf(path: Path) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load the dequantized fp32 model (still flagged GGUF-quantized) and its tokenizer."""
    try:
        model = AutoModelForCausalLM.from_pretrained(
            path.parent,
            gguf_file=path.name,
            dtype=torch.float32,
            quantization_config=GgufConfig(gguf_file=path.name, dequantize=True),
        )
        tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    except (ValueError, KeyError, OSError) as err:
        raise ModelError(
            f"transformers cannot load this GGUF file: {err}",
            where=str(path),
            fix="check the architecture is one transformers supports for GGUF (llama, mistral, qwen2, ...)",
        ) from err
    return model.eval(), tokenizer


def to_plain_model(model: PreTrainedModel) -> PreTrainedModel:
    """Rebuild `model` without its quantizer: same config minus `quantization_config`,
    same weights (copied), embeddings re-tied when the config says so."""
    config = copy.deepcopy(model.config)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    state = {name: tensor.detach().to("cpu", torch.float32) for name, tensor in model.state_dict().items()}
    plain.load_state_dict(state, strict=True)
    plain.tie_weights()
    return plain.eval()


def max_logit_diff(a: PreTrainedModel, b: PreTrainedModel, input_ids: torch.Tensor) -> float:
    """max |logits_a - logits_b| over one forward pass on `input_ids` (1, T)."""
    with torch.no_grad():
        return (a(input_ids).logits - b(input_ids).logits).abs().max().item()


def fix_tokenizer(tokenizer: PreTrainedTokenizerBase, model: PreTrainedModel) -> None:
    """Bound `model_max_length` by the context length (GGUF tokenizers leave it at ~1e30) and
    give the tokenizer a pad token (eos) when the file names none."""
    context = getattr(model.config, "max_position_embeddings", None)
    if context and tokenizer.model_max_length > context:
        tokenizer.model_max_length = context
    if tokenizer.pad_token is None and tokenizer.eos_token is not None:
        log.warning("GGUF tokenizer has no pad token; using eos %r as pad", tokenizer.eos_token)
        tokenizer.pad_token = tokenizer.eos_token


def import_gguf_report(gguf_path: str | Path, out_dir: str | Path, check: bool = True) -> ImportReport:
    """`import_gguf`, returning the logit check and timing as well (see the module docstring)."""
    start = time.perf_counter()
    path = check_gguf_file(gguf_path)
    quantized, tokenizer = load_gguf(path)
    plain = to_plain_model(quantized)
    fix_tokenizer(tokenizer, plain)
    diff = None
    if check:
        ids = torch.tensor([tokenizer.encode(CHECK_PROMPT)])
        diff = max_logit_diff(quantized, plain, ids)
        if diff > CHECK_TOLERANCE:
            raise ModelError(
                f"imported model disagrees with the GGUF model: max |logit diff| {diff:.3g} > {CHECK_TOLERANCE}",
                where=str(gguf_path),
                fix="report this file's architecture; the conversion lost or changed a weight",
            )
    sync_special_tokens(plain, tokenizer)
    out = save_hf_folder(plain, tokenizer, out_dir)
    seconds = time.perf_counter() - start
    log.info("imported %s -> %s in %.1f s (max |logit diff| %s)", path, out, seconds, diff)
    return ImportReport(out, diff, seconds, sum(p.numel() for p in plain.parameters()))


def import_gguf(gguf_path: str | Path, out_dir: str | Path, check: bool = True) -> Path:
    """Convert a `.gguf` checkpoint into a plain fp32 HF folder at `out_dir`; return its path.

    With `check=True` the folder's model must match the dequantized GGUF model's logits on a
    short prompt within 1e-4 (ModelError otherwise).
    """
    return import_gguf_report(gguf_path, out_dir, check).out_dir
