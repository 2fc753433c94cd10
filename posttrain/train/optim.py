"""Optimiser, LR schedule and the optimiser step, shared by every trainer."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from posttrain.errors import ConfigError


@dataclass
class OptimConfig:
    """AdamW with decoupled weight decay and a warm-up + cosine schedule."""

    lr: float = 1e-4
    """Peak learning rate."""
    weight_decay: float = 0.0
    """Decoupled weight decay (AdamW); not applied to biases and norm weights."""
    betas: tuple[float, float] = (0.9, 0.95)
    """Adam betas."""
    eps: float = 1e-8
    """Adam epsilon."""
    warmup_steps: int = 0
    """Linear warm-up from 0 to lr over this many optimiser steps."""
    warmup_ratio: float = 0.0
    """Alternative to warmup_steps: a fraction of the total steps (the larger wins)."""
    schedule: str = "cosine"
    """After warm-up: cosine | linear | constant."""
    min_lr_ratio: float = 0.1
    """Final LR as a fraction of lr for cosine/linear decay."""
    max_grad_norm: float = 1.0
    """Clip the global gradient norm to this value (0 disables clipping)."""

    def validate(self) -> None:
        if self.schedule not in ("cosine", "linear", "constant"):
            raise ConfigError(f"optim.schedule={self.schedule!r} is not one of cosine, linear, constant")
        if self.lr <= 0:
            raise ConfigError(f"optim.lr must be > 0, got {self.lr}")


def build_optimizer(model: torch.nn.Module, cfg: OptimConfig) -> torch.optim.AdamW:
    """AdamW over trainable params; no weight decay on 1-D params (biases, norms)."""
    decay, no_decay = [], []
    for _, p in model.named_parameters():
        if p.requires_grad:
            (decay if p.ndim >= 2 else no_decay).append(p)
    if not decay and not no_decay:
        raise ConfigError("the model has no trainable parameters", fix="check the peft section of the recipe")
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    groups = [g for g in groups if g["params"]]
    # fused=True: one kernel per param group, on CPU too (torch >= 2.4); 6x faster than foreach on CPU.
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps, fused=True)


def lr_lambda(step: int, total: int, warmup: int, schedule: str, min_ratio: float) -> float:
    """Multiplier on the peak LR at optimiser step `step` (0-based)."""
    if warmup > 0 and step < warmup:
        return (step + 1) / warmup
    if schedule == "constant" or total <= warmup:
        return 1.0
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    if schedule == "linear":
        return 1.0 - (1.0 - min_ratio) * progress
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: OptimConfig, total_steps: int):
    warmup = max(cfg.warmup_steps, int(cfg.warmup_ratio * total_steps))
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_lambda(s, total_steps, warmup, cfg.schedule, cfg.min_lr_ratio)
    )


def clip_grads(model: torch.nn.Module, max_grad_norm: float) -> float:
    """Clip the global gradient norm (if max_grad_norm > 0); return the norm before clipping."""
    params = [p for p in model.parameters() if p.grad is not None]
    if not params:
        return 0.0
    if max_grad_norm > 0:
        norm = torch.nn.utils.clip_grad_norm_(params, max_grad_norm, foreach=True)
    else:
        norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(p.grad) for p in params]))
    return float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)  # FSDP: a DTensor


def optimizer_step(optimizer: torch.optim.Optimizer, scheduler, scaler=None) -> None:
    """Step optimiser (through the fp16 loss scaler if any) and scheduler, then zero grads."""
    if scaler is not None:
        scaler.step(optimizer)
        scaler.update()
    else:
        optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
