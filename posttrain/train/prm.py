"""Process reward model: a per-step correctness score read at each step-end token.

The chain is rendered as ``<think>s1<step>s2<step>...sn</think>`` (separators configurable,
`posttrain.models.heads.prm_response`); the scalar head's value z at every step-end token
(each separator and, for the last step, the ``</think>`` token) is the logit of
P(step correct). Loss: binary cross-entropy at those positions only
(`posttrain.algos.rm_losses.prm_bce_loss`), hard or soft labels, aggregated over steps by
``train.loss_agg`` (token-mean = mean over all steps of the optimiser step;
seq-mean-token-mean = mean per chain, then over chains). Metrics: step accuracy, F1 of the
wrong-step class, first-error-step accuracy; on held-out data before training (the untrained
model with the same head init) and after, beside the loss and step AUC on a spaced subset of
the training chains (``train_loss``, ``train_step_auc``: over- vs under-fitting). ``final/``
loads with `posttrain.models.heads.load_reward_model`; `posttrain.rewards.models` scores with it.

``pair_weight`` > 0 adds `posttrain.algos.rm_losses.grouped_pair_loss` between steps at the same
index of chains of the same question whose labels differ (a batch then holds whole questions).
Held-out ``pair_acc`` measures that ranking: a PRM can reach a high pooled step AUC by learning
which questions the policy fails while ranking a question's chains no better than chance.
"""

from __future__ import annotations

import functools
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import torch

from posttrain.algos.aggregate import token_weights
from posttrain.algos.rm_losses import grouped_pair_loss, prm_bce_loss, step_metrics
from posttrain.distributed.config import DistributedConfig
from posttrain.distributed.parallel import all_reduce_sum, call, grad_sync, local_micro, world
from posttrain.models.heads import RewardModel
from posttrain.models.peft import PeftConfig
from posttrain.train.anomaly import AnomalyConfig
from posttrain.train.loop import LoopConfig, ModelConfig, prepare_run
from posttrain.train.optim import OptimConfig
from posttrain.train.precision import autocast
from posttrain.train.rm import attach_head, train_reward_model
from posttrain.train.rm_data import (
    ExamplePlan,
    PRMDataConfig,
    StepSample,
    collate_steps,
    prm_samples,
    prm_token_ids,
)


@dataclass
class PRMRecipe:
    """`posttrain prm RECIPE.yaml`: every key of a process reward-model recipe."""

    model: ModelConfig = field(default_factory=ModelConfig)
    data: PRMDataConfig = field(default_factory=PRMDataConfig)
    peft: PeftConfig = field(default_factory=PeftConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: LoopConfig = field(default_factory=LoopConfig)
    distributed: DistributedConfig = field(default_factory=DistributedConfig)
    """Several processes (DDP; FSDP cannot shard the reward head's wrapper): `distributed.nproc=2`."""
    anomaly: AnomalyConfig = field(default_factory=AnomalyConfig)
    """What counts as a run gone wrong (loss divergence, grad-norm spike) and what then: pause with
    a checkpoint (exit 75), warn, or roll back at a lower lr (`posttrain.train.anomaly`)."""
    output_dir: str = "runs/prm"
    """Run directory: config.yaml, metrics.jsonl, tb/, checkpoints/, eval.json, final/."""
    seed: int = 0
    """Seed of the head init, LoRA init and data order."""
    resume: bool = True
    """Continue from the newest complete checkpoint in output_dir if there is one."""
    eval_before: bool = True
    """Evaluate the untrained model (same head init) before step 1, as the baseline."""
    eval_train_chains: int = 256
    """Training chains (evenly spaced) also scored at every evaluation, as ``train_loss`` and
    ``train_step_auc``: a train AUC far above the held-out one means too few labelled chains
    for the steps run (over-fitting), both low means too few steps or too low an lr (0 = off)."""
    pair_weight: float = 0.0
    """Weight of the within-question pairwise loss added to the step BCE: Bradley-Terry between
    steps at the same index of two chains of one question whose labels differ (0 = BCE only).
    Batches then hold whole questions (about train.batch_size chains each)."""


def by_question(samples: list[StepSample]) -> list[list[StepSample]]:
    """Chains grouped by question (`StepSample.group`), in first-seen order."""
    groups: dict[str, list[StepSample]] = defaultdict(list)
    for s in samples:
        groups[s.group].append(s)
    return list(groups.values())


def collate_questions(questions: list[list[StepSample]], pad_id: int) -> dict[str, torch.Tensor]:
    """`collate_steps` over every chain of the questions, plus pair_group (B, T): at a step-end
    token, question index * 1024 + the step's index in its chain (-1 elsewhere)."""
    chains = [(q, s) for q, qs in enumerate(questions) for s in qs]
    batch = collate_steps([s for _, s in chains], pad_id)
    labels = batch["step_labels"]
    step_index = torch.cumsum((labels >= 0).long(), dim=1) - 1
    question = torch.tensor([q for q, _ in chains], dtype=torch.long)[:, None]
    batch["pair_group"] = torch.where(labels >= 0, question * 1024 + step_index, -1)
    return batch


def step_plan(
    samples: list[StepSample], batch_size: int, pad_id: int, seed: int, grouped: bool
) -> ExamplePlan:
    """Length-bucketed batches of chains, or (grouped) of whole questions, about ``batch_size``
    chains each."""
    if not grouped:
        return ExamplePlan(
            samples, [len(s.input_ids) for s in samples], batch_size, collate_steps, pad_id, seed
        )
    questions = by_question(samples)
    per = max(1, round(batch_size * len(questions) / max(len(samples), 1)))
    lengths = [max(len(s.input_ids) for s in q) for q in questions]
    return ExamplePlan(questions, lengths, per, collate_questions, pad_id, seed)


def step_logits(model: RewardModel, batch: dict[str, torch.Tensor], device) -> tuple[torch.Tensor, ...]:
    """(logits (N,), labels (N,), chain ids (N,), pair groups (N,); -1 when the batch has none)
    at the step-end positions of a batch, row-major."""
    values = model(batch["input_ids"].to(device), batch["attention_mask"].to(device))
    labels = batch["step_labels"].to(device)
    at = labels >= 0
    rows = torch.arange(labels.shape[0], device=device)[:, None].expand_as(labels)
    groups = batch["pair_group"].to(device)[at] if "pair_group" in batch else torch.full_like(rows[at], -1)
    return values[at], labels[at], rows[at], groups


def prm_step(
    model, micro: list[dict], loop: LoopConfig, device, scaler=None, pair_weight: float = 0.0
) -> dict[str, float]:
    """Forward/backward of one optimiser step of the PRM (the `run_loop` step_fn). On several
    ranks: each rank's rows of every micro-batch, the step / chain totals all-reduced. The
    pair loss (``pair_weight``) is the mean over micro-batches of each one's pair mean."""
    micro, scale = local_micro(micro), world()
    num_steps = float(sum(int((b["step_labels"] >= 0).sum()) for b in micro))
    num_chains = float(sum(int((b["step_labels"] >= 0).any(-1).sum()) for b in micro))
    num_steps, num_chains = (max(x, 1.0) for x in all_reduce_sum([num_steps, num_chains]))
    out = {"loss": 0.0, "step_acc": 0.0} | ({"pair_loss": 0.0, "pair_acc": 0.0} if pair_weight else {})
    for i, b in enumerate(micro):
        with grad_sync(model, i == len(micro) - 1):
            with autocast(loop.precision, device):
                logits, labels, seq, groups = call(model, step_logits, b, device)
            logits = logits.float()
            w = token_weights(seq, loop.loss_agg, num_tokens=num_steps, num_seqs=num_chains)
            loss, _ = prm_bce_loss(logits, labels, w)
            if pair_weight:
                pair, pm = grouped_pair_loss(logits, labels, groups)
                out["pair_loss"] += float(pair.detach()) / len(micro)
                out["pair_acc"] += float(pm["pair_acc"]) / len(micro)
                loss = loss + pair_weight * pair / len(micro)
            scaled = loss * scale if scale > 1 else loss
            (scaler.scale(scaled) if scaler is not None else scaled).backward()
        out["loss"] += float(loss.detach())
        out["step_acc"] += float(((logits.detach() >= 0) == (labels >= 0.5)).sum()) / num_steps
    return dict(zip(out, all_reduce_sum(list(out.values())), strict=True))


prm_step.distributed = True  # type: ignore[attr-defined]


@torch.no_grad()
def evaluate_prm(model: RewardModel, plan: ExamplePlan, device) -> dict[str, float]:
    """Held-out step accuracy, wrong-step F1, first-error accuracy and mean BCE per step; on a
    plan of whole questions also pair_acc (same question and step index, right step scored
    above wrong, pair-count-weighted over batches) and the pair count."""
    was_training = model.training
    model.eval()
    logits, labels, seqs, offset, hits, pairs = [], [], [], 0, 0.0, 0.0
    for b in plan.epoch(0):
        z, y, s, g = step_logits(model, b, device)
        logits.append(z.float().cpu())
        labels.append(y.cpu())
        seqs.append(s.cpu() + offset)
        offset += b["input_ids"].shape[0]
        if bool((g >= 0).any()):
            _, pm = grouped_pair_loss(z.float(), y, g)
            hits, pairs = hits + float(pm["pair_acc"] * pm["pairs"]), pairs + float(pm["pairs"])
    model.train(was_training)
    z, y, s = torch.cat(logits), torch.cat(labels), torch.cat(seqs)
    loss, _ = prm_bce_loss(z, y, torch.full_like(z, 1.0 / max(z.numel(), 1)))
    out = {"loss": float(loss), **{k: float(v) for k, v in step_metrics(torch.sigmoid(z), y, s).items()}}
    return out | ({"pair_acc": hits / pairs, "pairs": pairs} if pairs else {})


def spaced(items: list, n: int) -> list:
    """``n`` items evenly spaced over ``items`` (all of them if n >= len; none if n <= 0)."""
    if n <= 0:
        return []
    if n >= len(items):
        return list(items)
    return [items[i * len(items) // n] for i in range(n)]


def run_prm(cfg: PRMRecipe) -> Path:
    """Train and export a process reward model; returns the `final/` folder."""
    run = prepare_run(cfg, cfg.output_dir, cfg.seed, cfg.model, cfg.train, peft_cfg=cfg.peft)
    tok, pad = run.tokenizer, run.tokenizer.pad_token_id
    step_sep, last_end, _, _ = prm_token_ids(tok, cfg.data.step_sep, cfg.data.last_step_end)
    train, stats = prm_samples(tok, cfg.data, "train")
    run.print_data_table("train", stats)
    held_out, _ = prm_samples(tok, cfg.data, "eval")
    bs = cfg.train.batch_size
    plan = step_plan(train, bs, pad, cfg.seed, grouped=cfg.pair_weight > 0)
    evaluate = None
    if held_out:
        eval_plan = step_plan(held_out, bs, pad, 0, grouped=True)  # whole questions: pair_acc
        fit = spaced(train, cfg.eval_train_chains)
        fit_plan = step_plan(fit, bs, pad, 0, grouped=False) if fit else None

        def evaluate(model, step):
            metrics = evaluate_prm(model, eval_plan, run.device)
            if fit_plan is not None:
                on_train = evaluate_prm(model, fit_plan, run.device)
                metrics |= {f"train_{k}": on_train[k] for k in ("loss", "step_auc")}
            run.logger.log(step, metrics, prefix="eval/")
            return metrics

    info = {"kind": "prm", "step_sep": step_sep, "last_step_end": last_end}
    model = attach_head(run, cfg.seed, cfg.peft, info)
    step_fn = functools.partial(prm_step, pair_weight=cfg.pair_weight)
    functools.update_wrapper(step_fn, prm_step)  # keeps prm_step.distributed
    return train_reward_model(cfg, run, model, plan, step_fn, evaluate, info)


def prm_main(recipe_path: str | None, overrides: list[str]) -> Path:
    """`posttrain prm RECIPE.yaml [key=value ...]`."""
    from posttrain.config import load_recipe
    from posttrain.distributed.launch import run_command

    return run_command("prm", recipe_path, overrides, load_recipe(PRMRecipe, recipe_path, overrides), run_prm)
