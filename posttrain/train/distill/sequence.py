"""Sequence-level distillation (Kim & Rush 2016): the teacher writes completions, the student
trains on them with plain SFT (`posttrain.train.sft.run_sft`).

The teacher's completions are kept as text (special tokens dropped) in chat records
``{"messages": prompt + [{"role": "assistant", "content": text}]}``, so the student renders them
with its own chat template and tokenizer: teacher and student may tokenize differently.
``OUTPUT_DIR/teacher_generations.jsonl`` (written atomically) is reused when its
``.meta.json`` (teacher folder and weights, prompts, sampling settings) matches.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path

from posttrain.data.loaders import write_jsonl
from posttrain.errors import DataError
from posttrain.monitor.logger import console
from posttrain.train.distill.config import DistillRecipe
from posttrain.train.distill.teacher import cache_meta, prompt_records


def _messages(prompt) -> list[dict]:
    return [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)


def teacher_generations(cfg: DistillRecipe, teacher_path: str) -> Path:
    """Sample ``rollout.n`` teacher completions per prompt into SFT chat records; returns the file."""
    from posttrain.models.load import load_model, load_tokenizer, resolve_device
    from posttrain.rollout.engine import get_engine
    from posttrain.rollout.sampling import SamplingParams
    from posttrain.train.precision import resolve as resolve_precision

    out = Path(cfg.output_dir) / "teacher_generations.jsonl"
    prompts = prompt_records(cfg.data)
    ro = cfg.rollout
    settings = {
        "n": ro.n,
        "temperature": ro.temperature,
        "top_p": ro.top_p,
        "max_new_tokens": ro.max_new_tokens,
    }
    meta = {
        **cache_meta(teacher_path, 0, []),
        "prompts": hashlib.sha256(json.dumps(prompts, sort_keys=True, default=str).encode()).hexdigest(),
        "sampling": settings,
        # bf16 and fp32 sampling draw different completions: the precision auto resolves to here
        "precision": resolve_precision(cfg.train.precision, resolve_device(cfg.teacher.device)).precision,
        "seed": cfg.seed,
    }
    meta_file = out.with_suffix(".meta.json")
    if out.is_file() and meta_file.is_file() and json.loads(meta_file.read_text()) == meta:
        console.print(f"reusing the teacher's generations {out}")
        return out
    tok = load_tokenizer(teacher_path)
    teacher = load_model(teacher_path, dtype=cfg.teacher.dtype, device=cfg.teacher.device, tokenizer=tok)
    if ro.backend == "hf":
        engine = get_engine("hf", model=teacher, tokenizer=tok, max_batch_rows=ro.max_batch_rows,
                            precision=cfg.train.precision)  # fmt: skip
    else:
        engine = get_engine(ro.backend, model=teacher_path, tokenizer=tok)
    params = SamplingParams(**settings, seed=cfg.seed, source="distill.rollout (teacher)")
    completions = engine.generate(prompts, params)
    records = [
        {
            "messages": _messages(prompts[c.prompt_index]["prompt"])
            + [{"role": "assistant", "content": c.text}]
        }
        for c in completions
        if c.text.strip()
    ]
    if not records:
        raise DataError(
            "the teacher wrote only empty completions", where=teacher_path, fix="check the teacher model"
        )
    console.print(
        f"teacher wrote {len(records)} completions for {len(prompts)} prompts "
        f"({len(completions) - len(records)} empty ones dropped)"
    )
    meta_file.unlink(missing_ok=True)
    write_jsonl(out, records)
    meta_file.write_text(json.dumps(meta, indent=1))
    return out


def run_sequence(cfg: DistillRecipe, teacher_path: str) -> Path:
    """Teacher generations, then `run_sft` of the student on them in OUTPUT_DIR; returns final/."""
    from posttrain.train.sft import SFTRecipe, run_sft

    data_file = teacher_generations(cfg, teacher_path)
    data = dataclasses.replace(cfg.data, train=str(data_file), limit=None)
    sft = SFTRecipe(
        model=cfg.student, data=data, peft=cfg.peft, optim=cfg.optim, train=cfg.train,
        output_dir=cfg.output_dir, seed=cfg.seed, resume=cfg.resume,
    )  # fmt: skip
    return run_sft(sft)
