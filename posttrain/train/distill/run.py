"""`run_distill`: one entry point for the three distillation modes (see `DistillRecipe`).

- sequence: `posttrain.train.distill.sequence` (teacher text -> student SFT);
- logit: fixed samples (`build_samples`, as SFT reads them), the teacher in memory or its top-k
  cache (`posttrain.train.distill.teacher`), the loss step of `posttrain.train.distill.logit`;
- on_policy: the same step over batches the student samples (`posttrain.train.distill.on_policy`).

Logit and on-policy modes run on `posttrain.train.loop.run_loop`: checkpoints with exact resume,
metrics.jsonl, NaN guards; the student is exported to OUTPUT_DIR/final.
"""

from __future__ import annotations

import gc
from pathlib import Path

import torch

from posttrain.distributed.parallel import is_main, main_first
from posttrain.distributed.trainer import export_final
from posttrain.errors import PosttrainError
from posttrain.monitor.logger import console
from posttrain.train.distill.config import DistillRecipe
from posttrain.train.distill.logit import SamplePlan, make_step
from posttrain.train.distill.teacher import (
    TopK,
    cache_meta,
    check_same_tokenizer,
    load_topk,
    prompt_records,
    save_topk,
    teacher_topk,
)
from posttrain.train.loop import Run, prepare_run, resolve_model_path, run_loop, sft_evaluator


def _load_teacher(cfg: DistillRecipe, path: str, tokenizer) -> torch.nn.Module:
    from posttrain.models.load import load_model

    teacher = load_model(path, dtype=cfg.teacher.dtype, device=cfg.teacher.device, tokenizer=tokenizer)
    teacher.eval().requires_grad_(False)
    return teacher


def cached_topk(cfg: DistillRecipe, run: Run, teacher_path: str, samples: list) -> TopK:
    """The teacher's top-k on ``samples``: from the cache when it matches, else computed (the
    teacher is loaded, run once, and freed) and written to the cache."""
    folder = Path(cfg.cache_dir) if cfg.cache_dir else run.dir / "teacher_topk"
    meta = cache_meta(teacher_path, cfg.teacher_topk, samples)
    found = main_first(  # several processes: rank 0 computes and writes the cache, the others read it
        lambda: (
            _main_topk(cfg, run, teacher_path, samples, folder, meta)
            if is_main()
            else load_topk(folder, meta)
        )
    )
    if found is None:
        raise PosttrainError(
            f"rank 0 left no matching teacher top-k cache in {folder}",
            fix="read rank 0's error above (the teacher's pass failed there)",
        )
    return found


def _main_topk(cfg: DistillRecipe, run: Run, teacher_path: str, samples: list, folder: Path, meta) -> TopK:
    found = load_topk(folder, meta)
    if found is not None:
        console.print(f"reusing the teacher's top-{cfg.teacher_topk} cache {folder}")
        return found
    teacher = _load_teacher(cfg, teacher_path, run.tokenizer)
    tok = run.tokenizer
    topk = teacher_topk(teacher, samples, cfg.teacher_topk, cfg.train.batch_size, tok.pad_token_id, len(tok))
    del teacher
    gc.collect()
    save_topk(topk, folder, meta)
    console.print(f"teacher top-{cfg.teacher_topk} of {topk.indices.shape[0]} positions cached in {folder}")
    return topk


def _logit_plan(cfg: DistillRecipe, run: Run, teacher_path: str):
    from posttrain.data.sft_data import build_samples

    tok = run.tokenizer
    samples, stats = build_samples(tok, cfg.data, "train")
    run.print_data_table("train", stats)
    teacher, topk = None, None
    if cfg.teacher_topk:
        topk = cached_topk(cfg, run, teacher_path, samples)
    else:
        teacher = _load_teacher(cfg, teacher_path, tok)
    plan = SamplePlan(samples, cfg.train.batch_size, tok.pad_token_id, cfg.seed, topk)
    eval_samples, _ = build_samples(tok, cfg.data, "eval")
    evaluate = None
    if eval_samples:
        eval_plan = SamplePlan(eval_samples, cfg.train.batch_size, tok.pad_token_id, 0)
        evaluate = sft_evaluator(run, eval_plan, eval_samples[: cfg.train.num_samples], cfg.train)
    return plan, teacher, evaluate


def _on_policy_plan(cfg: DistillRecipe, run: Run, teacher_path: str):
    from posttrain.rollout.engine import get_engine
    from posttrain.train.distill.on_policy import OnPolicyPlan

    tok, ro = run.tokenizer, cfg.rollout
    if ro.backend == "hf":
        engine = get_engine("hf", model=run.model, tokenizer=tok, max_batch_rows=ro.max_batch_rows,
                            precision=cfg.train.precision)  # fmt: skip
    else:
        engine = get_engine(ro.backend, model=resolve_model_path(cfg.student.path), tokenizer=tok)
    demos = None
    if ro.student_fraction < 1.0:  # GKD's mixed data: the other steps train on the demonstrations
        from posttrain.data.sft_data import build_samples

        samples, _ = build_samples(tok, cfg.data, "train")
        demos = SamplePlan(samples, ro.prompts_per_step * ro.n, tok.pad_token_id, cfg.seed)
    plan = OnPolicyPlan(engine, run.model, prompt_records(cfg.data), ro, tok.pad_token_id, cfg.seed, demos)
    return plan, _load_teacher(cfg, teacher_path, tok), None


def run_distill(cfg: DistillRecipe) -> Path:
    """Distil the teacher into the student; returns the student's exported `final/` folder."""
    from posttrain.models.load import load_tokenizer
    from posttrain.models.peft import export_model

    cfg.validate()
    teacher_path = resolve_model_path(cfg.teacher.path)
    if cfg.mode == "sequence":
        from posttrain.train.distill.sequence import run_sequence

        return run_sequence(cfg, teacher_path)
    student_path = resolve_model_path(cfg.student.path)
    check_same_tokenizer(
        load_tokenizer(teacher_path), load_tokenizer(student_path), teacher_path, student_path
    )
    run = prepare_run(cfg, cfg.output_dir, cfg.seed, cfg.student, cfg.train, peft_cfg=cfg.peft)
    build = _logit_plan if cfg.mode == "logit" else _on_policy_plan
    plan, teacher, evaluate = build(cfg, run, teacher_path)
    step_fn = make_step(teacher, cfg.loss, len(run.tokenizer))
    model = run_loop(run, run.model, plan, cfg.optim, cfg.train, step_fn=step_fn, evaluate=evaluate)
    out = Path(cfg.output_dir) / "final"
    final = export_final(model, lambda m: export_model(m, run.tokenizer, out, cfg.peft), out)  # rank 0 writes
    run.finish(final)
    return final


def distill_main(recipe_path: str | None, overrides: list[str]) -> Path:
    """CLI entry: `posttrain distill RECIPE.yaml [key=value ...]`."""
    from posttrain.config import load_recipe
    from posttrain.distributed.launch import run_command

    cfg = load_recipe(DistillRecipe, recipe_path, overrides)
    return run_command("distill", recipe_path, overrides, cfg, run_distill)
