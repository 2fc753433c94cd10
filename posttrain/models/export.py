"""`posttrain export`: a trained model as a plain Hugging Face folder or as GGUF files.

Source (`model_dir`): a plain HF model folder, a PEFT adapter folder (LoRA / IA3, merged with
`merge_and_unload` into the base named in `adapter_config.json`), a run directory (its
`final/` is used), or `default`. Reward and value heads (`reward_head.safetensors`,
`value_head.safetensors`) are not part of the causal LM and are dropped.

Formats:
- `hf`: model.safetensors + config.json + tokenizer (with chat template) + generation_config.json.
- `gguf`: one `model-<type>.gguf` per entry of `gguf_types` (f16, q8_0; f32 too), written by
  `gguf_export.write_gguf`. With `check` (default), every file is read back by an independent
  reader, transformers (`from_pretrained(OUT, gguf_file=...)`, model and tokenizer), and must
  (1) tokenize a sample chat (system, user, assistant with `<think>`, digits, accents, CJK,
  tabs, double spaces) to the source tokenizer's ids, and (2) give logits on it within
  `TOLERANCES[type]` of the source model, measured relative to the logit scale:
  `max|logits_gguf - logits_src| / max|logits_src|`.

Both formats are written into `OUT.tmp-<pid>` beside OUT and renamed into place, with
`export.json` (source, fingerprint, files, check figures) last, so an interrupted export never
leaves a half-written OUT (stale `OUT.tmp-<pid>` folders of dead processes are removed on the
next run). A rerun whose source fingerprint, format and types match `export.json` is skipped.
"""

from __future__ import annotations

import gc
import hashlib
import json
import logging
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from posttrain.errors import ConfigError, ModelError
from posttrain.models import fused_ops
from posttrain.models.gguf_export import GGUF_TYPES, gguf_arch, write_gguf
from posttrain.models.load import load_model, load_tokenizer, replace_dir, save_hf_folder

log = logging.getLogger(__name__)

MANIFEST = "export.json"
# max|logit diff| / max|logit| allowed per GGUF type. Measured: tiny test models f32 0,
# f16 ~2e-4, q8_0 ~5e-3; SmolLM2-135M f16 1.1e-3, q8_0 3.7e-2 (mean |diff| 0.16 on a logit
# scale of 39, same argmax at 97.6% of positions). A wrong tensor layout gives ~1.
TOLERANCES: dict[str, float] = {"f32": 1e-5, "f16": 5e-3, "q8_0": 1e-1}
CHECK_MESSAGES: list[dict[str, str]] = [
    {"role": "system", "content": "You are a careful assistant."},
    {"role": "user", "content": "Compute 12 + 7 * 3.  Héllo, 日本! (tabs\there)\n\nThanks."},
    {"role": "assistant", "content": "<think>7 * 3 = 21\n12 + 21 = 33</think>\nAnswer: 33"},
]


@dataclass
class ExportRecipe:
    """`posttrain export RECIPE.yaml` (or `posttrain export MODEL_DIR OUT --format hf|gguf`)."""

    model_dir: str = "default"
    """Model folder, PEFT adapter folder, run directory (its final/ is used) or `default`."""
    format: Literal["hf", "gguf"] = "gguf"
    """hf: a merged plain Hugging Face folder; gguf: GGUF files for llama.cpp / Ollama."""
    gguf_types: list[str] = field(default_factory=lambda: ["f16", "q8_0"])
    """GGUF file types to write, one file each (f32, f16, q8_0); ignored for hf."""
    check: bool = True
    """gguf: read every file back with transformers and require the sample chat's token ids
    to match and its logits to agree within TOLERANCES (ModelError otherwise)."""
    output_dir: str = "runs/export"
    """OUT: the exported folder (HF files, or the .gguf files), with export.json."""
    force: bool = False
    """Export again even when OUT/export.json says this source was already exported."""

    def __post_init__(self) -> None:
        bad = [t for t in self.gguf_types if t not in GGUF_TYPES]
        if bad or not self.gguf_types:
            raise ConfigError(
                f"unknown or empty gguf_types {self.gguf_types!r}",
                where="gguf_types",
                fix=f"list one or more of: {', '.join(GGUF_TYPES)}",
            )
        if self.format not in ("hf", "gguf"):
            raise ConfigError(f"unknown format {self.format!r}", where="format", fix="use hf or gguf")


def resolve_source(model_dir: str) -> Path:
    """The folder to export: `default` -> the embedded model; a run dir -> its final/."""
    from posttrain.train.loop import resolve_model_path

    path = Path(resolve_model_path(model_dir)).expanduser()
    markers = ("config.json", "adapter_config.json")
    if not any((path / m).is_file() for m in markers) and any(
        (path / "final" / m).is_file() for m in markers
    ):
        path = path / "final"
    if not any((path / m).is_file() for m in markers):
        raise ModelError(
            "not a model folder, adapter folder or run directory with final/",
            where=str(model_dir),
            fix="pass a folder with config.json (or adapter_config.json), e.g. runs/sft/final",
        )
    return path.resolve()


def adapter_base(folder: Path) -> Path:
    """The base model folder an adapter folder names (adapter_config.json)."""
    config = json.loads((folder / "adapter_config.json").read_text())
    base = config.get("base_model_name_or_path")
    if not base or not Path(base).expanduser().is_dir():
        raise ModelError(
            f"the adapter's base model {base!r} is not a local folder",
            where=f"{folder / 'adapter_config.json'}:base_model_name_or_path",
            fix="set base_model_name_or_path to the base model folder the adapter was trained on",
        )
    return Path(base).expanduser().resolve()


def load_merged(folder: Path) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """fp32 CPU model + tokenizer of `folder`; an adapter is merged into its base first."""
    if not (folder / "adapter_config.json").is_file():
        tokenizer = load_tokenizer(folder)
        return load_model(folder, dtype="float32", device="cpu", tokenizer=tokenizer).eval(), tokenizer
    import peft

    base_dir = adapter_base(folder)
    # The adapter folder's own tokenizer (it may add tokens) wins over the base's.
    tokenizer = load_tokenizer(folder if (folder / "tokenizer_config.json").is_file() else base_dir)
    base = load_model(base_dir, dtype="float32", device="cpu", tokenizer=tokenizer)
    wrapped = peft.PeftModel.from_pretrained(base, str(folder))
    if wrapped.peft_config["default"].is_prompt_learning:
        raise ModelError(
            "prefix / prompt tuning adds virtual tokens, not a weight delta, so it cannot be merged",
            where=str(folder),
            fix="load it with peft.AutoPeftModelForCausalLM; only LoRA / IA3 adapters export",
        )
    return wrapped.merge_and_unload().eval(), tokenizer


def fingerprint(folders: list[Path]) -> str:
    """sha256 over (name, size, mtime) of the files in `folders` (not their bytes: cheap)."""
    digest = hashlib.sha256()
    for folder in folders:
        for item in sorted(folder.iterdir()):
            if item.is_file():
                stat = item.stat()
                digest.update(f"{item}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
    return digest.hexdigest()


def source_folders(folder: Path) -> list[Path]:
    if (folder / "adapter_config.json").is_file():
        return [folder, adapter_base(folder)]
    return [folder]


def is_up_to_date(out: Path, wanted: dict[str, Any]) -> bool:
    manifest = out / MANIFEST
    if not manifest.is_file():
        return False
    try:
        done = json.loads(manifest.read_text())
    except json.JSONDecodeError:
        return False
    return all(done.get(key) == value for key, value in wanted.items())


def remove_stale_staging(out: Path) -> None:
    """Delete `OUT.tmp-<pid>` folders left by killed exports (their process is gone)."""
    for staged in out.parent.glob(f"{out.name}.tmp-*"):
        pid = staged.name.rsplit("-", 1)[-1]
        if not pid.isdigit() or int(pid) == os.getpid():
            continue
        try:
            os.kill(int(pid), 0)  # signal 0: only asks whether the process exists
        except ProcessLookupError:
            shutil.rmtree(staged, ignore_errors=True)
        except PermissionError:
            pass


def sample_ids(tokenizer: PreTrainedTokenizerBase) -> list[int]:
    """Token ids of the check chat (rendered with the chat template when there is one)."""
    if tokenizer.chat_template:
        return list(tokenizer.apply_chat_template(CHECK_MESSAGES, tokenize=True, return_dict=False))
    return tokenizer.encode("\n".join(m["content"] for m in CHECK_MESSAGES))


def check_gguf(
    source: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, path: Path, gguf_type: str
) -> dict[str, Any]:
    """Read `path` back with transformers; compare tokenization and logits with the source."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    ids = sample_ids(tokenizer)
    reread_tok = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    reread_ids = (
        sample_ids(reread_tok)
        if tokenizer.chat_template
        else reread_tok.encode("\n".join(m["content"] for m in CHECK_MESSAGES))
    )
    reread = AutoModelForCausalLM.from_pretrained(
        path.parent, gguf_file=path.name, dtype=torch.float32
    ).eval()
    fused_ops.install(reread)  # the same forward as the source's (`load_model` swapped its modules)
    with torch.no_grad():
        batch = torch.tensor([ids])
        want, got = source(batch).logits, reread(batch).logits
    abs_diff = (got - want).abs()
    diff, scale = abs_diff.max().item(), want.abs().max().item()
    del reread
    gc.collect()
    figures = {
        "tokens_equal": reread_ids == ids,
        "chat_template_equal": reread_tok.chat_template == tokenizer.chat_template,
        "sample_tokens": len(ids),
        "max_abs_logit_diff": diff,
        "mean_abs_logit_diff": abs_diff.mean().item(),
        "top1_agreement": (got.argmax(-1) == want.argmax(-1)).float().mean().item(),
        "logit_scale": scale,
        "relative_diff": diff / max(scale, 1e-12),
        "tolerance": TOLERANCES[gguf_type],
    }
    if not figures["tokens_equal"] or figures["relative_diff"] > figures["tolerance"]:
        raise ModelError(
            f"the GGUF file read back by transformers disagrees with the source: {json.dumps(figures)}",
            where=str(path),
            fix="report the model's architecture and tokenizer; export with format=hf meanwhile",
        )
    return figures


def write_outputs(recipe: ExportRecipe, model, tokenizer, staged: Path, name: str) -> dict[str, Any]:
    """Write the export into `staged` (a folder not yet existing); return the files' figures."""
    from posttrain.train.faults import maybe_kill  # crash-safety tests kill the export here

    if recipe.format == "hf":
        save_hf_folder(model, tokenizer, staged)
        maybe_kill("mid-export", 1)
        return {"hf": {"file": "model.safetensors", "bytes": (staged / "model.safetensors").stat().st_size}}
    gguf_arch(model.config)  # unsupported architecture: fail before writing anything
    staged.mkdir(parents=True)
    files: dict[str, Any] = {}
    for i, gguf_type in enumerate(recipe.gguf_types, start=1):
        path = write_gguf(model, tokenizer, staged / f"model-{gguf_type}.gguf", gguf_type, name)
        files[gguf_type] = {"file": path.name, "bytes": path.stat().st_size}
        if recipe.check:
            files[gguf_type].update(check_gguf(model, tokenizer, path, gguf_type))
        log.info("wrote %s: %s", path.name, files[gguf_type])
        maybe_kill("mid-export", i)
    return files


def run_export(recipe: ExportRecipe) -> Path:
    """Export `recipe.model_dir` to `recipe.output_dir` (see the module docstring); returns OUT."""
    start = time.perf_counter()
    source = resolve_source(recipe.model_dir)
    out = Path(recipe.output_dir).expanduser().resolve()
    wanted = {
        "source": str(source),
        "fingerprint": fingerprint(source_folders(source)),
        "format": recipe.format,
        "gguf_types": recipe.gguf_types if recipe.format == "gguf" else [],
    }
    if not recipe.force and is_up_to_date(out, wanted):
        log.info("export %s is up to date with %s (force=true to redo)", out, source)
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_staging(out)
    model, tokenizer = load_merged(source)
    staged = out.parent / f"{out.name}.tmp-{os.getpid()}"
    shutil.rmtree(staged, ignore_errors=True)
    try:
        files = write_outputs(recipe, model, tokenizer, staged, f"{model.config.model_type}-{source.name}")
        manifest = {**wanted, "files": files, "seconds": round(time.perf_counter() - start, 2)}
        (staged / MANIFEST).write_text(json.dumps(manifest, indent=1) + "\n")
        replace_dir(staged, out)
    except BaseException:
        shutil.rmtree(staged, ignore_errors=True)
        raise
    log.info("exported %s -> %s (%s) in %.1f s", source, out, recipe.format, time.perf_counter() - start)
    return out


def cli_arguments(args: list[str], fmt: str | None, gguf_types: str | None) -> tuple[str | None, list[str]]:
    """`(recipe_path, overrides)` from the command line: `RECIPE.yaml [k=v ...]` or the short
    form `MODEL_DIR OUT [k=v ...]`; `--format` and `--gguf-types a,b` become overrides."""
    recipe_path, overrides = None, list(args)
    if overrides and overrides[0].endswith((".yaml", ".yml")):
        recipe_path = overrides.pop(0)
    elif overrides and "=" not in overrides[0]:
        if len(overrides) < 2 or "=" in overrides[1]:
            raise ConfigError(
                "the short form needs MODEL_DIR and OUT",
                where="posttrain export",
                fix="posttrain export MODEL_DIR OUT --format hf|gguf, or posttrain export RECIPE.yaml",
            )
        # JSON-quoted: a YAML scalar, so a path like `2024` or `on` stays a string
        model_dir, out = json.dumps(overrides[0]), json.dumps(overrides[1])
        overrides = [f"model_dir={model_dir}", f"output_dir={out}", *overrides[2:]]
    if fmt is not None:
        overrides.append(f"format={fmt}")
    if gguf_types is not None:
        overrides.append(f"gguf_types=[{gguf_types}]")
    return recipe_path, overrides


def export_main(recipe_path: str | None, overrides: list[str]) -> Path:
    from posttrain.config import load_recipe

    return run_export(load_recipe(ExportRecipe, recipe_path, overrides))
