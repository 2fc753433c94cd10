"""Supervised fine-tuning: a plain loop over library calls.

loss = aggregated masked NLL on trained (assistant) tokens
(`posttrain.train.lm_loss.causal_lm_loss`), AdamW + warm-up/cosine,
gradient accumulation and clipping, periodic eval loss and sample
generations, atomic checkpoints with exact resume, and a plain Hugging Face
folder in `final/` at the end.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import torch

from posttrain.data.collate import verify_packed_attention
from posttrain.data.quality.section import CleanSection, clean_data
from posttrain.data.sft_data import BatchPlan, DataConfig, build_samples
from posttrain.distributed.config import DistributedConfig
from posttrain.distributed.launch import refuse_fsdp_eval_recipe
from posttrain.errors import ConfigError
from posttrain.eval.hook import EvalHookConfig, with_recipe_eval
from posttrain.models.peft import PeftConfig, export_model
from posttrain.train.anomaly import AnomalyConfig
from posttrain.train.loop import LoopConfig, ModelConfig, prepare_run, run_loop, sft_evaluator
from posttrain.train.optim import OptimConfig

log = logging.getLogger(__name__)


@dataclass
class SFTRecipe:
    """`posttrain sft RECIPE.yaml`: every key of an SFT recipe."""

    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    clean: CleanSection | None = None
    """Clean data.train with `posttrain data clean`'s steps before training (cached; null: off)."""
    peft: PeftConfig = field(default_factory=PeftConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: LoopConfig = field(default_factory=LoopConfig)
    eval: EvalHookConfig = field(default_factory=EvalHookConfig)
    """Held-out metrics on your own data: ``eval.recipe`` names an eval recipe run every eval step."""
    distributed: DistributedConfig = field(default_factory=DistributedConfig)
    """Several processes (DDP / FSDP2): `distributed.nproc=2`, or launch with torchrun."""
    anomaly: AnomalyConfig = field(default_factory=AnomalyConfig)
    """What counts as a run gone wrong (loss divergence, grad-norm spike) and what then: pause with
    a checkpoint (exit 75), warn, or roll back at a lower lr (`posttrain.train.anomaly`)."""
    output_dir: str = "runs/sft"
    """Run directory: config.yaml, metrics.jsonl, tb/, checkpoints/, final/."""
    seed: int = 0
    """Seed for model init of new parameters, data order and sampling."""
    resume: bool = True
    """Continue from the newest complete checkpoint in output_dir if there is one."""


def run_sft(cfg: SFTRecipe) -> Path:
    """Train and export; returns the path of the exported `final/` folder."""
    if cfg.data.packing and cfg.peft.method in ("prefix", "prompt"):
        raise ConfigError(
            f"peft.method={cfg.peft.method} prepends virtual tokens once per row, so it cannot train packed rows",
            where="data.packing",
            fix="set data.packing=false",
        )
    refuse_fsdp_eval_recipe(cfg.distributed, cfg.eval.recipe)
    run = prepare_run(cfg, cfg.output_dir, cfg.seed, cfg.model, cfg.train, peft_cfg=cfg.peft)
    model, tokenizer = run.model, run.tokenizer
    if cfg.data.packing:
        verify_packed_attention(model)
    train_samples, stats = build_samples(
        tokenizer, clean_data(cfg.clean, cfg.data, "train", cfg.output_dir), "train"
    )
    run.print_data_table("train", stats)
    eval_samples, _ = build_samples(tokenizer, cfg.data, "eval")
    plan = BatchPlan(
        train_samples,
        cfg.train.batch_size,
        cfg.train.seq_len,
        cfg.data.packing,
        tokenizer.pad_token_id,
        cfg.seed,
    )
    eval_plan = (
        BatchPlan(
            eval_samples, cfg.train.batch_size, cfg.train.seq_len, cfg.data.packing, tokenizer.pad_token_id, 0
        )
        if eval_samples
        else None
    )
    sample_prompts = [s for s in eval_samples[: cfg.train.num_samples]] if eval_samples else []
    evaluate = sft_evaluator(run, eval_plan, sample_prompts, cfg.train) if eval_plan is not None else None
    evaluate = with_recipe_eval(cfg.eval, run, evaluate)
    model = run_loop(run, model, plan, cfg.optim, cfg.train, evaluate=evaluate, anomaly=cfg.anomaly)
    from posttrain.distributed.trainer import export_final

    out = Path(cfg.output_dir) / "final"
    final = export_final(model, lambda m: export_model(m, tokenizer, out, cfg.peft), out)  # rank 0 writes
    run.finish(final)
    return final


def sft_main(recipe_path: str | None, overrides: list[str]) -> Path:
    from posttrain.config import load_recipe
    from posttrain.distributed.launch import run_command

    torch.set_num_threads(max(1, torch.get_num_threads()))
    return run_command("sft", recipe_path, overrides, load_recipe(SFTRecipe, recipe_path, overrides), run_sft)
