"""Outcome reward model: a scalar head on a causal LM trained on preferences or rankings.

r(x, y) = the head's value at the last token of the rendered ``prompt + response``
(`posttrain.models.heads`). Loss (`posttrain.algos.rm_losses`):
- ``bt``: Bradley-Terry ``-log sigmoid(r+ - r- - m)`` over every ranked pair (one per
  preference record; all i < j pairs of a ranking);
- ``pl``: Plackett-Luce ``-sum_l log softmax_{k >= l}(r)_l`` over each full ranking (the same
  as ``bt`` without margin on pairs).
A micro-batch's loss is weighted by its share of the step's groups, so gradient accumulation
gives the full-batch gradient for ``pl`` and pair data. Metrics: pairwise accuracy, Kendall
tau (rankings), reward margin; on held-out data before training (the untrained model with the
same head init) and after. The export in ``final/`` loads with
`posttrain.models.heads.load_reward_model`.
"""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F

from posttrain.algos.rm_losses import (
    bradley_terry_loss,
    kendall_tau,
    pairwise_accuracy,
    plackett_luce_loss,
    ranking_pairs,
)
from posttrain.distributed.config import DistributedConfig
from posttrain.distributed.parallel import all_reduce_sum, call, grad_sync, is_main, rank, shard_groups, world
from posttrain.distributed.trainer import export_final
from posttrain.errors import ConfigError
from posttrain.models.heads import RewardModel, ScalarHead, last_token_values, save_reward_model
from posttrain.models.peft import PeftConfig
from posttrain.monitor.logger import console
from posttrain.train.anomaly import AnomalyConfig
from posttrain.train.loop import LoopConfig, ModelConfig, Run, prepare_run, run_loop
from posttrain.train.optim import OptimConfig
from posttrain.train.precision import autocast
from posttrain.train.rm_data import ExamplePlan, RMDataConfig, collate_groups, rm_groups


@dataclass
class RMLossConfig:
    """Which ranking loss trains the reward model."""

    name: Literal["bt", "pl"] = "bt"
    """bt: Bradley-Terry on every ranked pair; pl: Plackett-Luce on each full ranking (= bt on pairs)."""
    margin: float = 0.0
    """bt: margin m in -log sigmoid(r+ - r- - m) for records without their own `margin` field."""

    def validate(self) -> None:
        if self.name == "pl" and self.margin != 0.0:
            raise ConfigError("loss.margin applies to bt only", where="loss.margin", fix="set loss.name=bt")


@dataclass
class RMRecipe:
    """`posttrain rm RECIPE.yaml`: every key of an outcome reward-model recipe."""

    model: ModelConfig = field(default_factory=ModelConfig)
    data: RMDataConfig = field(default_factory=RMDataConfig)
    loss: RMLossConfig = field(default_factory=RMLossConfig)
    peft: PeftConfig = field(default_factory=PeftConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: LoopConfig = field(default_factory=LoopConfig)
    distributed: DistributedConfig = field(default_factory=DistributedConfig)
    """Several processes (DDP; FSDP cannot shard the reward head's wrapper): `distributed.nproc=2`."""
    anomaly: AnomalyConfig = field(default_factory=AnomalyConfig)
    """What counts as a run gone wrong (loss divergence, grad-norm spike) and what then: pause with
    a checkpoint (exit 75), warn, or roll back at a lower lr (`posttrain.train.anomaly`)."""
    output_dir: str = "runs/rm"
    """Run directory: config.yaml, metrics.jsonl, tb/, checkpoints/, eval.json, final/."""
    seed: int = 0
    """Seed of the head init, LoRA init and data order."""
    resume: bool = True
    """Continue from the newest complete checkpoint in output_dir if there is one."""
    eval_before: bool = True
    """Evaluate the untrained model (same head init) before step 1, as the baseline."""


def group_rewards(
    model: RewardModel, batch: dict[str, torch.Tensor], device
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rewards (B, K) of each group's responses in ranking order, and the mask (B, K) of real ones."""
    values = model(batch["input_ids"].to(device), batch["attention_mask"].to(device))
    rewards = last_token_values(values, batch["attention_mask"].to(device))
    index = batch["group_index"].to(device)
    return rewards[index.clamp(min=0)], index >= 0


def rm_loss(
    rewards: torch.Tensor, mask: torch.Tensor, margin: torch.Tensor, name: str
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The configured loss on (B, K) rewards; margin (B,) applies to each group's pairs (bt)."""
    if name == "pl":
        return plackett_luce_loss(rewards, mask)
    k = rewards.shape[1]
    i, j = torch.triu_indices(k, k, offset=1, device=rewards.device)
    pair_margin = margin[:, None].expand(-1, i.numel())[mask[:, i] & mask[:, j]]
    better, worse = ranking_pairs(rewards, mask)
    return bradley_terry_loss(better, worse, pair_margin)


def _pairs(group_index: torch.Tensor) -> int:
    k = (group_index >= 0).sum(-1)
    return int((k * (k - 1) // 2).sum())


def rm_step(
    model, micro: list[dict], loop: LoopConfig, device, scaler=None, *, loss_name: str
) -> dict[str, float]:
    """Forward/backward of one optimiser step of the outcome RM (the `run_loop` step_fn).

    On several ranks each takes its groups of every micro-batch (`shard_groups`); its mean loss
    is weighted by its share of the micro-batch's pairs (bt; groups for pl), so the sum over
    the ranks is the one-process loss and DDP's average the one-process gradient."""
    total = sum(int(b["group_index"].shape[0]) for b in micro)
    scale = world()
    out = {"loss": 0.0, "pairwise_acc": 0.0, "margin": 0.0}
    for i, b in enumerate(micro):
        local, real = shard_groups(b, rank(), scale) if scale > 1 else (b, True)
        share = b["group_index"].shape[0] / total
        pair_part = _pairs(local["group_index"]) / max(_pairs(b["group_index"]), 1) if real else 0.0
        group_part = local["group_index"].shape[0] / b["group_index"].shape[0] if real else 0.0
        part = group_part if loss_name == "pl" else pair_part
        with grad_sync(model, i == len(micro) - 1):
            with autocast(loop.precision, device):
                rewards, mask = call(model, group_rewards, local, device)
            rewards = rewards.float()
            loss, _ = rm_loss(rewards, mask, local["margin"].to(device), loss_name)
            scaled = loss * share if scale == 1 else loss * (share * part * scale)
            (scaler.scale(scaled) if scaler is not None else scaled).backward()
        if real and pair_part > 0:
            better, worse = ranking_pairs(rewards.detach(), mask)
            out["pairwise_acc"] += float(pairwise_accuracy(rewards, mask)) * share * pair_part
            out["margin"] += float((better - worse).mean()) * share * pair_part
        out["loss"] += float(loss.detach()) * share * part
    return dict(zip(out, all_reduce_sum(list(out.values())), strict=True))


rm_step.distributed = True  # type: ignore[attr-defined]


@torch.no_grad()
def evaluate_rm(model: RewardModel, plan: ExamplePlan, device, loss_name: str = "bt") -> dict[str, float]:
    """Held-out pairwise accuracy, Kendall tau, mean margin (better - worse) and loss."""
    was_training = model.training
    model.eval()
    rewards, masks, margins = [], [], []
    for b in plan.epoch(0):
        r, m = group_rewards(model, b, device)
        rewards.append(r.float().cpu())
        masks.append(m.cpu())
        margins.append(b["margin"])
    model.train(was_training)
    k = max(r.shape[1] for r in rewards)
    r = torch.cat([F.pad(x, (0, k - x.shape[1])) for x in rewards])
    m = torch.cat([F.pad(x, (0, k - x.shape[1])) for x in masks])
    loss, _ = rm_loss(r, m, torch.cat(margins), loss_name)
    better, worse = ranking_pairs(r, m)
    return {
        "loss": float(loss),
        "pairwise_acc": float(pairwise_accuracy(r, m)),
        "kendall_tau": float(kendall_tau(r, m)),
        "margin": float((better - worse).mean()),
        "reward_mean": float(r[m].mean()),
    }


def attach_head(run: Run, seed: int, peft_cfg: PeftConfig, info: dict[str, Any]) -> RewardModel:
    """Wrap the run's (PEFT-wrapped) model with a new `ScalarHead` seeded by `seed`."""
    if peft_cfg.method in ("prefix", "prompt"):
        raise ConfigError(
            f"peft.method={peft_cfg.method} prepends virtual tokens; reward heads read the model's own positions",
            where="peft.method",
            fix="use full, lora, ia3 or bitfit",
        )
    head = ScalarHead(run.model.config.hidden_size, seed=seed).to(run.device)
    return RewardModel(run.model, head, info)


def train_reward_model(cfg: Any, run: Run, model: RewardModel, plan, step_fn, evaluate, info: dict) -> Path:
    """Shared by `run_rm` and `run_prm`: baseline eval, `run_loop`, final eval, export."""
    results: dict[str, Any] = {}
    if evaluate is not None and cfg.eval_before and run.resume_from is None:
        results["before"] = evaluate(model, 0)
    log_eval = (lambda m, step: results.__setitem__("after", evaluate(m, step))) if evaluate else None
    run_loop(run, model, plan, cfg.optim, cfg.train, step_fn=step_fn, evaluate=log_eval, anomaly=cfg.anomaly)
    if results and is_main():  # several processes: rank 0 evaluated and writes
        (run.dir / "eval.json").write_text(json.dumps(results, indent=1))
        for when, metrics in results.items():
            console.print(f"held-out {when}: " + "  ".join(f"{k} {v:.4f}" for k, v in metrics.items()))
    out = Path(cfg.output_dir) / "final"
    final = export_final(model, lambda m: save_reward_model(m, run.tokenizer, out, cfg.peft, info), out)
    run.finish(final)
    return final


def run_rm(cfg: RMRecipe) -> Path:
    """Train and export an outcome reward model; returns the `final/` folder."""
    run = prepare_run(cfg, cfg.output_dir, cfg.seed, cfg.model, cfg.train, peft_cfg=cfg.peft)
    pad = run.tokenizer.pad_token_id
    train, stats = rm_groups(run.tokenizer, cfg.data, "train", cfg.loss.margin)
    run.print_data_table("train", stats)
    held_out, _ = rm_groups(run.tokenizer, cfg.data, "eval", cfg.loss.margin)
    bs = cfg.train.batch_size
    plan = ExamplePlan(train, [max(map(len, g.responses)) for g in train], bs, collate_groups, pad, cfg.seed)
    evaluate = None
    if held_out:
        eval_plan = ExamplePlan(
            held_out, [max(map(len, g.responses)) for g in held_out], bs, collate_groups, pad, 0
        )

        def evaluate(model, step):
            metrics = evaluate_rm(model, eval_plan, run.device, cfg.loss.name)
            run.logger.log(step, metrics, prefix="eval/")
            return metrics

    model = attach_head(run, cfg.seed, cfg.peft, {"kind": "orm", "loss": cfg.loss.name})
    step_fn = functools.partial(rm_step, loss_name=cfg.loss.name)
    return train_reward_model(cfg, run, model, plan, step_fn, evaluate, model.info)


def rm_main(recipe_path: str | None, overrides: list[str]) -> Path:
    """`posttrain rm RECIPE.yaml [key=value ...]`."""
    from posttrain.config import load_recipe
    from posttrain.distributed.launch import run_command

    return run_command("rm", recipe_path, overrides, load_recipe(RMRecipe, recipe_path, overrides), run_rm)
