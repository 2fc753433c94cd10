"""`posttrain distill RECIPE.yaml`: every key of a distillation recipe, and its checks."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from posttrain.algos.distill_losses import DISTILL_KINDS, DistillKind
from posttrain.data.sft_data import DataConfig
from posttrain.distributed.config import DistributedConfig
from posttrain.errors import ConfigError
from posttrain.models.peft import PeftConfig
from posttrain.train.loop import LoopConfig, ModelConfig
from posttrain.train.optim import OptimConfig

Mode = Literal["sequence", "logit", "on_policy"]


@dataclass
class DistillLossConfig:
    """The per-token divergence (`posttrain.algos.distill_losses`) of logit and on-policy modes."""

    kind: DistillKind = "forward_kl"
    """forward_kl = KL(teacher || student) | reverse_kl = KL(student || teacher) | jsd (generalised, beta)."""
    beta: float = 0.5
    """jsd only: m = beta p_teacher + (1 - beta) q_student; 0 = forward KL, 1 = reverse KL (GKD / TRL)."""
    temperature: float = 1.0
    """Both logits are divided by it before the softmax."""
    tau_squared: bool = False
    """Multiply the divergence by temperature^2 (Hinton et al. 2015): the soft-target gradient keeps
    its T=1 scale as T grows (it shrinks ~1/T^2 otherwise); false = TRL's GKD convention (no factor)."""
    nll_weight: float = 0.0
    """logit mode: add this times the student's NLL of the data's own token at every trained
    position (Hinton et al. 2015's mix of hard and soft targets); 0 = the divergence alone."""


@dataclass
class DistillRolloutConfig:
    """Sampling: the teacher's completions (sequence mode) or the student's (on_policy mode)."""

    backend: str = "hf"
    """hf (the model module itself samples) | vllm (CUDA, `[gpu]` extra) | a registered backend."""
    prompts_per_step: int = 8
    """on_policy: prompts sampled per micro-batch (rows = prompts_per_step * n)."""
    n: int = 1
    """Completions per prompt."""
    temperature: float = 1.0
    """Sampling temperature; 0 = greedy (sequence mode only: on-policy samples from the student)."""
    top_p: float = 1.0
    max_new_tokens: int = 128
    max_batch_rows: int = 256
    """Rows decoded together by the hf engine."""
    student_fraction: float = 1.0
    """on_policy: GKD's lambda, the share of optimiser steps whose batch the student samples; the
    other steps train on the data's own demonstrations (same divergence, teacher-scored), chosen by
    a coin seeded by (seed, epoch, index). 1 = only student samples; 0 = logit KD."""


@dataclass
class DistillRecipe:
    """`posttrain distill RECIPE.yaml`: every key of a distillation recipe.

    Modes: ``sequence`` (the teacher writes completions, the student SFTs on them; tokenizers
    may differ), ``logit`` (the student matches the teacher's per-token distribution on the data's
    tokens; one shared tokenizer), ``on_policy`` (GKD: the student samples, the teacher scores
    every position of the student's own tokens; one shared tokenizer).
    """

    mode: Mode = "logit"
    """sequence | logit | on_policy."""
    teacher: ModelConfig = field(default_factory=ModelConfig)
    """The teacher model folder (`default` = the embedded tiny model)."""
    student: ModelConfig = field(default_factory=ModelConfig)
    """The student model folder it starts from."""
    data: DataConfig = field(default_factory=DataConfig)
    """SFT records or the task suite (as `posttrain sft` reads them); sequence and on_policy use
    their prompts (a chat record's messages before its last assistant turn; prompt records as is)."""
    peft: PeftConfig = field(default_factory=PeftConfig)
    """How the student is trained (full, LoRA, ...); exported merged into final/."""
    loss: DistillLossConfig = field(default_factory=DistillLossConfig)
    rollout: DistillRolloutConfig = field(default_factory=DistillRolloutConfig)
    teacher_topk: int = 0
    """logit mode: > 0 caches the teacher's top-k log-probs on the training tokens to disk and frees
    the teacher before training (loss renormalised over the top-k); 0 keeps the teacher in memory."""
    cache_dir: str | None = None
    """Where the top-k cache lives (null = OUTPUT_DIR/teacher_topk); reused when it matches."""
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: LoopConfig = field(default_factory=LoopConfig)
    distributed: DistributedConfig = field(default_factory=DistributedConfig)
    """logit mode on several processes (DDP; FSDP for full fine-tuning): `distributed.nproc=2`, or
    torchrun. Each rank trains on its rows of every micro-batch; the teacher runs on each rank's rows."""
    output_dir: str = "runs/distill"
    """Run directory: config.yaml, metrics.jsonl, checkpoints/, final/ (the student)."""
    seed: int = 0
    """Seed of data order and sampling."""
    resume: bool = True
    """Continue from the newest complete checkpoint in output_dir if there is one."""

    def validate(self) -> None:
        if self.loss.kind not in DISTILL_KINDS:
            raise ConfigError(
                f"unknown distillation loss {self.loss.kind!r}",
                where="loss.kind",
                fix=f"valid: {', '.join(DISTILL_KINDS)}",
            )
        if not 0.0 <= self.loss.beta <= 1.0:
            raise ConfigError(f"loss.beta={self.loss.beta} is outside [0, 1]", where="loss.beta")
        if self.loss.temperature <= 0:
            raise ConfigError("loss.temperature must be > 0", where="loss.temperature")
        if self.loss.nll_weight < 0:
            raise ConfigError("loss.nll_weight must be >= 0", where="loss.nll_weight")
        if self.loss.nll_weight and self.mode != "logit":
            raise ConfigError(
                f"loss.nll_weight trains on the data's tokens; mode={self.mode} has no fixed data tokens "
                "(on_policy would fit the student's own samples, sequence is plain SFT already)",
                where="loss.nll_weight",
                fix="set loss.nll_weight=0, or use mode=logit",
            )
        if self.teacher_topk < 0:
            raise ConfigError("teacher_topk must be >= 0", where="teacher_topk")
        if self.teacher_topk and self.mode != "logit":
            raise ConfigError(
                f"teacher_topk caches the teacher on fixed data; mode={self.mode} does not read it",
                where="teacher_topk",
                fix="set teacher_topk=0 (on_policy scores fresh student samples with the teacher in memory)",
            )
        if self.mode != "sequence" and self.peft.method in ("prefix", "prompt"):
            raise ConfigError(
                f"peft.method={self.peft.method} prepends virtual tokens, so the student's positions do not "
                "line up with the teacher's",
                where="peft.method",
                fix="use lora, ia3, bitfit or full",
            )
        ro = self.rollout
        if ro.n < 1 or ro.prompts_per_step < 1 or ro.max_new_tokens < 1:
            raise ConfigError("rollout.n, prompts_per_step and max_new_tokens must be >= 1", where="rollout")
        if not 0.0 <= ro.student_fraction <= 1.0:
            raise ConfigError(
                f"rollout.student_fraction={ro.student_fraction} is outside [0, 1]",
                where="rollout.student_fraction",
            )
        if self.mode == "on_policy" and ro.temperature <= 0:
            raise ConfigError(
                "on-policy distillation samples from the student: temperature must be > 0",
                where="rollout.temperature",
            )
        check_processes(self.mode, self.distributed)


def check_processes(mode: str, cfg: DistributedConfig) -> None:
    """Only logit mode trains on several processes: on_policy samples with one engine per run and
    sequence generates its data file before training; both refuse more than one process."""
    from posttrain.distributed.launch import requested_world

    several = requested_world(cfg)
    if mode == "logit" or several <= 1:
        return
    fix = {
        "on_policy": "run it in one process (distributed.nproc=1, no torchrun), or use mode=logit "
        "(several processes) on teacher-written or data tokens",
        "sequence": "run it in one process (distributed.nproc=1, no torchrun); to train the student "
        "on several processes, run `posttrain sft` on OUTPUT_DIR/teacher_generations.jsonl with distributed.nproc",
    }[mode]
    raise ConfigError(
        f"distill mode={mode} does not run on several processes ({several} asked)",
        where="distributed.nproc",
        fix=fix,
    )
