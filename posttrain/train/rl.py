"""Online RL (PPO, GRPO, Dr.GRPO, RLOO, REINFORCE, REINFORCE++, step-aware GRPO): a plain loop.

One step::

    prompts (sampler) -> engine.generate(n per prompt) -> rewards (weighted terms, PRM steps)
      [dynamic sampling: drop groups whose n rewards are all equal, refill, <= max_refill_rounds]
    -> old log-probs, reference log-probs, critic values -> [KL in the reward] -> advantages
    -> ppo_epochs x mini_batches clipped updates (`posttrain.train.rl_update`) -> engine.update_weights

The algorithm is a choice of registered advantage estimator (`posttrain.algos.advantages`) and
policy loss (`posttrain.algos.policy_losses`): GRPO = grpo + ppo_clip with the KL (k3) in the
loss; PPO = gae + ppo_clip with a critic and the KL (k1) in the reward; REINFORCE++ =
reinforce_pp with the KL in the reward; RLOO = rloo; Dr.GRPO = dr_grpo + seq-mean-token-sum.

- Old log-probs: the HF engine samples with the policy module itself, so the log-probs it
  reports ARE the old policy's (`old_logprobs: auto` uses them when the policy is fp32; they
  equal a recomputed forward to ~1e-5, tested at 1e-4 absolute: KV-cache decoding vs one full
  forward sums in another order). With one optimiser step per rollout, the update's own forward
  (detached) is the old policy's (``update``: no extra pass; bf16, other engines); otherwise
  ``recompute`` runs one no-grad forward (`rl_update.old_logprob_source`). They serve every epoch: PPO's
  old policy is the one that sampled.
- Reference pi_ref: with a LoRA / IA3 adapter, the same model with the adapter disabled (no
  second copy); otherwise a frozen copy of the starting weights; none at all (no copy, no
  forward) when ``kl.coef`` is 0 and the coefficient is fixed.
- Process rewards: a ``prm`` reward term with ``placement: steps`` puts each step's
  P(correct) on its step-end token (`posttrain.train.rl_data`). GAE (PPO) then credits every
  token with the discounted step rewards that follow it; for critic-free training use
  ``grpo_process`` (step-aware GRPO, DeepSeekMath 4.1.3: outcome z-score + the group-normalised
  step rewards from token t on). Other outcome estimators see each row's reward sum.
- Multi-turn (``data.multi_turn``): n conversations per prompt with an environment
  (`posttrain.rollout.multiturn`), split into episodes (one per turn when the template
  rewrites history, else one masked episode); the advantage estimator runs over the group's
  conversations (or turns, ``baseline: turn``), every episode token gets its turn's advantage
  (`posttrain.train.rl_update.turn_advantages`), and the update is the single-turn one.
- Sampler/trainer mismatch: every step logs ``mismatch/*`` (`posttrain.algos.rollout_correction`):
  the trainer's log-probs at the sampling weights (the recompute pass, or the update's first
  forward when the sampler's are used as old log-probs) against the sampler's, token and
  sequence level. ``rollout.autocast: bfloat16`` samples in bf16 while training in fp32;
  ``algorithm.rollout_correction`` weighs each token's policy loss by the capped (TIS) or masked
  importance ratio trainer / sampler.
- Entropy: ``algorithm.entropy_control`` adapts the entropy-bonus coefficient after each step
  to hold the mean token entropy in a band (`posttrain.algos.entropy`); ``high_entropy_frac``
  restricts the policy gradient to the highest-entropy tokens ("80/20").
- Checkpoints: weights (and the critic head), optimizer, scheduler, RNG, the prompt sampler's
  position, the KL coefficient and the entropy coefficient. The engine's generator is re-seeded at every generate call
  from (seed, step, refill round), so resuming at step k replays step k+1 exactly; an
  interrupted run resumed equals an uninterrupted one bit for bit.
"""

from __future__ import annotations

import copy
import json
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from posttrain.algos.advantages import compute_advantages
from posttrain.algos.entropy import adaptive_entropy_coef
from posttrain.algos.kl import KLController, kl_estimate
from posttrain.algos.rollout_correction import correction_weights, mismatch_metrics
from posttrain.data.quality.section import CleanSection, clean_data
from posttrain.distributed.config import DistributedConfig
from posttrain.distributed.parallel import is_main, on_main
from posttrain.distributed.trainer import stop_agreed
from posttrain.errors import ConfigError, TrainingAnomaly
from posttrain.models.peft import PeftConfig
from posttrain.monitor.logger import console, progress_bar
from posttrain.train.anomaly import ALARM_EVERY, AnomalyConfig, AnomalyGuard, alarms, scale_lr
from posttrain.train.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from posttrain.train.faults import RunInterrupted, StopRequest, maybe_kill
from posttrain.train.loop import ModelConfig, Run, prepare_run
from posttrain.train.optim import OptimConfig, build_optimizer, build_scheduler
from posttrain.train.precision import Precision, autocast, precast_linears
from posttrain.train.rl_data import (
    PromptSampler,
    RewardSet,
    RewardTermConfig,
    RLDataConfig,
    Scored,
    check_reward_terms,
    check_scorers,
    load_prompts,
    rollout_tensors,
)
from posttrain.train.rl_dist import check_rl_processes, pass_budget, rank0_collect, wrap_policy
from posttrain.train.rl_eval import build_evaluator, evaluate_on_main
from posttrain.train.rl_rollout import (
    EpisodeBatch,
    RolloutConfig,
    build_engine,
    check_multi_turn,
    conversation_metrics,
    episode_batch,
    generate_conversations,
    generate_groups,
    prefetch_groups,
    rollout_metrics,
    rollout_seed,
)
from posttrain.train.rl_update import (
    AlgorithmConfig,
    old_logprob_source,
    ppo_update,
    score_rollout,
    spread_turns,
    turn_advantages,
)

ADAPTER_METHODS = ("lora", "qlora", "ia3")


@dataclass
class RLTrainConfig:
    """Steps, logging, evaluation and checkpoint cadence."""

    max_steps: int = 100
    """RL steps (each: one rollout, ppo_epochs x mini_batches optimiser steps)."""
    log_every: int = 1
    eval_every: int = 0
    """Held-out accuracy every N steps; 0 = only at the end."""
    save_every: int = 0
    """Checkpoint every N steps; 0 = only at the end."""
    keep_last: int = 2
    threads: int = 0
    """torch CPU threads (0 = torch's default)."""
    precision: Precision = "auto"
    """Of the update and, unless rollout.autocast is set, of sampling: auto (bf16 autocast where the
    hardware computes bf16 natively; posttrain.train.precision; models of hidden size <= 256 sample
    in fp32 on CPU, posttrain.rollout.hf_engine.decode_precision) | fp32 | bf16 | fp16 (CUDA only).
    Any precision but fp32 recomputes old log-probs (old_logprobs: auto)."""
    tensorboard: bool = True
    loggers: list[str] | None = None
    """Trackers mirroring metrics.jsonl (tensorboard, mlflow, wandb, trackio; local/offline);
    unset = [tensorboard] if `tensorboard` else none."""
    chunk_size: int = 1024
    """Rows per chunk of the LM head + log-softmax."""
    alarm_kl: float = 0.5
    """Warn when the token-mean KL to the reference exceeds this (0 = never): the policy is
    drifting away, usually before held-out accuracy drops."""
    alarm_clipped: float = 0.5
    """Warn when more than this share of completions hit rollout.max_new_tokens (0 = never)."""


@dataclass
class RLEvalConfig:
    """Held-out greedy accuracy on the task suite (separate from the training reward)."""

    tasks: list[str] | None = None
    """Tasks to grade; null = data.tasks when the prompts come from the task suite, else none."""
    levels: list[int] | None = None
    """Levels to grade; null = data.levels."""
    n_per_level: int = 25
    """Test problems per task and level (0 = off)."""
    max_new_tokens: int = 128
    before: bool = True
    """Also evaluate the starting policy (step 0)."""
    recipe: str | None = None
    """An eval recipe (`posttrain eval` YAML: your datasets, decodings, k) run at the same steps as
    the task-suite accuracy, its metrics logged under eval/ beside it
    (`posttrain.eval.hook.recipe_evaluator`); null = off."""
    recipe_overrides: list[str] = field(default_factory=list)
    """``key=value`` overrides of that recipe (e.g. ``limit=50``)."""


@dataclass
class RLRecipe:
    """`posttrain rl RECIPE.yaml`: every key of an online-RL recipe."""

    model: ModelConfig = field(default_factory=ModelConfig)
    peft: PeftConfig = field(default_factory=PeftConfig)
    data: RLDataConfig = field(default_factory=RLDataConfig)
    clean: CleanSection | None = None
    """Clean data.prompts with `posttrain data clean`'s steps before training (cached; null: off)."""
    rewards: list[RewardTermConfig] = field(default_factory=lambda: [RewardTermConfig()])
    algorithm: AlgorithmConfig = field(default_factory=AlgorithmConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(lr=1e-5, schedule="constant"))
    train: RLTrainConfig = field(default_factory=RLTrainConfig)
    eval: RLEvalConfig = field(default_factory=RLEvalConfig)
    anomaly: AnomalyConfig = field(default_factory=AnomalyConfig)
    """What counts as a run gone wrong (KL, entropy, length, reward hacking, no learning signal, ...)
    and what then: pause with a checkpoint (exit 75), warn, or roll back (`posttrain.train.anomaly`)."""
    distributed: DistributedConfig = field(default_factory=DistributedConfig)
    """The update on several processes (DDP, hf engine): `distributed.nproc=2` or torchrun; rank 0
    samples, every rank trains its rows of each mini-batch (`posttrain.train.rl_dist`)."""
    output_dir: str = "runs/rl"
    """Run directory: config.yaml, metrics.jsonl, eval_summary.json, checkpoints/, final/."""
    seed: int = 0
    """Seed of sampling, mini-batch order, critic and LoRA init."""
    resume: bool = True
    """Continue from the newest complete checkpoint in output_dir if there is one."""

    def validate(self) -> None:
        check_reward_terms(self.rewards)
        self.algorithm.validate()
        self.rollout.validate()
        self.anomaly.validate()
        if self.data.multi_turn is not None:
            check_multi_turn(self.data.multi_turn, self.algorithm, self.rewards, self.rollout)
        check_rl_processes(self.distributed, self.rollout.backend, self.data.multi_turn is not None)
        if self.peft.method in ("prefix", "prompt"):
            raise ConfigError(
                f"peft.method={self.peft.method} prepends virtual tokens the rollout engine does not see",
                where="peft.method",
                fix="use lora, ia3, bitfit or full",
            )


# ---------------------------------------------------------------- set-up


@dataclass
class Reference:
    """pi_ref: a frozen copy, or the policy with its adapter disabled."""

    model: torch.nn.Module
    adapter: bool

    def context(self):
        from posttrain.train.preference_data import reference_context

        return reference_context(self.model) if self.adapter else None


def build_reference(cfg: RLRecipe, model: torch.nn.Module, precision: str = "fp32") -> Reference | None:
    """None when the KL coefficient is 0 and fixed (no copy, no forward); see the module docstring.
    A frozen copy keeps its linear weights in the autocast dtype of ``precision`` (`precast_linears`:
    the same log-probs, no per-pass weight casts, half their memory)."""
    kl = cfg.algorithm.kl
    if kl.coef == 0 and kl.target is None:
        return None
    if cfg.peft.method in ADAPTER_METHODS:
        return Reference(model, adapter=True)
    frozen = copy.deepcopy(model).eval()
    frozen.requires_grad_(False)
    precast_linears(frozen, precision)
    return Reference(frozen, adapter=False)


@dataclass
class Session:
    """Everything one RL run holds between steps."""

    cfg: RLRecipe
    run: Run
    model: torch.nn.Module
    value_head: torch.nn.Module | None
    module: torch.nn.Module
    """What the optimiser and checkpoints see (policy, plus the critic head)."""
    engine: Any
    reference: Reference | None
    rewards: RewardSet
    sampler: PromptSampler
    kl: KLController
    optimizer: torch.optim.Optimizer
    scheduler: Any
    problems: list
    step: int = 0
    entropy_coef: float = 0.0
    """The entropy-bonus coefficient now (adapted after each step with algorithm.entropy_control)."""
    env: Any = None
    """The conversation environment with data.multi_turn, else None."""
    guard: AnomalyGuard | None = None
    """The anomaly detectors and their action (cfg.anomaly)."""


def eval_problems(cfg: RLRecipe) -> list:
    from posttrain.data.tasks import task_problems

    tasks = (
        cfg.eval.tasks
        if cfg.eval.tasks is not None
        else (cfg.data.tasks if cfg.data.prompts == "tasks" else [])
    )
    if not tasks or cfg.eval.n_per_level <= 0:
        return []
    levels = cfg.eval.levels if cfg.eval.levels is not None else cfg.data.levels
    return task_problems(tasks, "test", cfg.eval.n_per_level, cfg.data.seed, levels)


def setup(cfg: RLRecipe, model=None, tokenizer=None) -> Session:
    """Run dir, policy (+ critic head), reference, engine, rewards, prompts, optimiser; resumes if asked."""
    from posttrain.models.heads import ScalarHead
    from posttrain.models.peft import apply_peft

    if model is not None and cfg.peft.method != "full":
        model = apply_peft(model, cfg.peft)
    run = prepare_run(cfg, cfg.output_dir, cfg.seed, cfg.model, cfg.train, model, tokenizer, cfg.peft)
    model, tok = run.model, run.tokenizer
    records = load_prompts(clean_data(cfg.clean, cfg.data, "prompts", cfg.output_dir))
    if cfg.data.multi_turn is None:
        check_scorers(records, cfg.rewards)
    reference = build_reference(cfg, model, run.precision)  # before resuming: pi_ref is the starting policy
    value_head = None
    module = model
    if cfg.algorithm.advantage == "gae":
        value_head = ScalarHead(model.config.hidden_size, seed=cfg.seed).to(run.device)
        module = torch.nn.ModuleDict({"policy": model, "value_head": value_head})
    algo, ro = cfg.algorithm, cfg.rollout
    total = cfg.train.max_steps * algo.ppo_epochs * algo.mini_batches
    optimizer = build_optimizer(module, cfg.optim)
    scheduler = build_scheduler(optimizer, cfg.optim, total)
    s = Session(
        cfg, run, model, value_head, module, build_engine(cfg.rollout, cfg.model.path, model, tok, cfg.train.precision), reference,
        RewardSet(cfg.rewards, tok, ro.max_new_tokens, ro.overlong_buffer), PromptSampler(records, cfg.data.seed),
        KLController(algo.kl.coef, algo.kl.target, algo.kl.horizon), optimizer, scheduler, eval_problems(cfg),
        entropy_coef=algo.entropy_coef,
    )  # fmt: skip
    if cfg.data.multi_turn is not None:
        from posttrain.rollout.multiturn import get_env

        s.env = get_env(cfg.data.multi_turn.env)
    if cfg.rollout.backend == "ray":  # rollout.ray.reward_workers score in parallel (0: here)
        s.rewards = s.engine.reward_pool(s.rewards)
    s.guard = AnomalyGuard(cfg.anomaly, run.logger)
    if run.resume_from is not None:
        s.guard.load_state_dict(restore(s, run.resume_from).get("anomaly"))
    wrap_policy(s.module, cfg.distributed, run.device)  # DDP from outside, after the resume
    model.train()
    return s


# ---------------------------------------------------------------- one step


def collect(s: Session, step: int) -> tuple[list[Scored], list[Scored], dict[str, float]]:
    """Generate and score this step's groups (`posttrain.train.rl_rollout.generate_groups`)."""

    def generate():
        with autocast(s.run.precision, s.run.device):  # rollout.autocast, when set, overrides it inside
            out = generate_groups(s.engine, s.sampler, s.rewards, s.cfg.rollout, s.cfg.seed, step)
            prefetch_groups(s.engine, s.sampler, s.cfg.rollout, s.cfg.seed, step + 1, s.cfg.train.max_steps)
            return out

    return rank0_collect(generate, s.sampler)  # several processes: rank 0 samples for all


def collect_episodes(s: Session, step: int) -> tuple[EpisodeBatch | None, dict[str, float]]:
    """Multi-turn: generate this step's conversation groups and split them into episode rows."""
    mt = s.cfg.data.multi_turn
    with autocast(s.run.precision, s.run.device):
        kept, seen, metrics = generate_conversations(
            s.engine, s.sampler, s.env, s.cfg.rollout, mt, s.cfg.seed, step
        )
    metrics.update(conversation_metrics(seen, kept, mt.credit))
    metrics["generated_tokens"] = sum(len(t.token_ids) for g in seen for c in g for t in c.turns)
    if not kept:
        return None, metrics
    batch, split = episode_batch(kept, s.run.tokenizer, mt)
    return batch, {**metrics, **split}


def prepare_batch(
    s: Session, groups: list[Scored], episodes: EpisodeBatch | None = None
) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
    """Rollout tensors plus old/ref log-probs, critic values, KL-shaped rewards and advantages.

    ``episodes`` (multi-turn, its rows are ``groups``): advantages per turn (`turn_advantages`).
    """
    algo, ro = s.cfg.algorithm, s.cfg.rollout
    data = rollout_tensors(groups, s.run.tokenizer.pad_token_id, ro.overlong_filter)
    rows = max(1, -(-data["valid"].shape[0] // algo.mini_batches))
    score = lambda model, head, ctx=None: score_rollout(  # noqa: E731
        model, head, data, temperature=ro.temperature, rows_per_pass=rows, context=ctx,
        chunk_size=s.cfg.train.chunk_size, token_budget=pass_budget(algo.micro_batch_tokens, s.run.device),
    )  # fmt: skip
    metrics: dict[str, float] = {}
    dtype = next(s.model.parameters()).dtype
    values, source = None, old_logprob_source(algo, ro, s.run.precision, dtype, s.value_head is not None)
    if source == "recompute" or s.value_head is not None:
        logp, values = score(s.model, s.value_head)
        if source == "recompute":
            sampler_logp, data["old_logp"] = data["old_logp"], logp * data["valid"]
            metrics.update(mismatch_metrics(data["old_logp"], sampler_logp, data["valid"]))
            if algo.rollout_correction is not None:
                rc = algo.rollout_correction
                data["is_weight"], rc_metrics = correction_weights(
                    data["old_logp"], sampler_logp, data["mask"], level=rc.level, mode=rc.mode, cap=rc.cap
                )
                metrics.update(rc_metrics)
    if source != "recompute":  # measured by the update's first forward (`ppo_update`)
        data["sampler_logp"] = data["old_logp"]
    metrics = {k: float(v) for k, v in metrics.items()}
    rewards = data["rewards"]
    if s.reference is not None:  # (with source update, the rollout's KL from the sampler's log-probs)
        data["ref_logp"] = score(s.reference.model, None, s.reference.context())[0]
        kl = kl_estimate(data["old_logp"], data["ref_logp"], algo.kl.estimator) * data["valid"]
        metrics["kl/rollout_seq_mean"] = float(kl.sum(-1).mean())
        if algo.kl.placement == "reward":
            rewards = rewards - s.kl.coef * kl
    if values is not None:
        data["old_values"] = values
    if episodes is None:
        adv, returns, adv_metrics = compute_advantages(
            algo.advantage, rewards, data["valid"], group=data["group"], values=values, gamma=algo.gamma,
            lam=algo.lam, eps=algo.eps, step_rewards=data["step_rewards"], step_mask=data["step_mask"],
        )  # fmt: skip
    else:
        e = episodes
        per_turn, adv_metrics = turn_advantages(
            algo.advantage, e.credits, e.turn_valid, e.returns, e.group,
            baseline=s.cfg.data.multi_turn.baseline, eps=algo.eps,
        )  # fmt: skip
        adv = spread_turns(per_turn, e.rows, data["valid"])
        returns = spread_turns(e.credits, e.rows, data["valid"])
    data["advantages"], data["returns"] = adv, returns
    if source == "update":  # `minibatch_loss` takes the update's forward, detached
        del data["old_logp"]
    valid = data["valid"]
    metrics.update({k: float(v) for k, v in adv_metrics.items()})
    metrics.update({"advantages/min": float(adv[valid].min()), "advantages/max": float(adv[valid].max())})
    return data, metrics


def train_step(s: Session, step: int) -> dict[str, float]:
    """One RL step (module docstring); returns its metrics."""
    cfg, algo = s.cfg, s.cfg.algorithm
    episodes = None
    if s.env is not None:
        episodes, metrics = collect_episodes(s, step)
        kept, gen_tokens = (episodes.groups if episodes else []), metrics.pop("generated_tokens")
    else:
        kept, seen, metrics = collect(s, step)
        metrics.update(rollout_metrics(seen, kept))
        gen_tokens = sum(len(c.token_ids) for g in seen for c in g.completions)
    metrics["throughput/generate_tok_s"] = gen_tokens / max(metrics["time/generate_s"], 1e-9)
    if not kept:
        console.print(f"[yellow]step {step}[/yellow]: every group had equal rewards; no update this step")
        return {**metrics, "rollout/skipped": 1.0, "kl_coef": s.kl.coef}
    t0 = time.perf_counter()
    gen = torch.Generator().manual_seed(rollout_seed(cfg.seed, step, 999))
    norm = float(cfg.rollout.max_new_tokens)
    with autocast(s.run.precision, s.run.device):  # old, reference and new log-probs alike
        data, adv_metrics = prepare_batch(s, kept, episodes)
        upd, tokens = ppo_update(
            s.module, s.model, s.value_head, data, s.optimizer, s.scheduler, algo, s.kl.coef, generator=gen,
            temperature=cfg.rollout.temperature, norm=norm, max_grad_norm=cfg.optim.max_grad_norm, step=step,
            chunk_size=cfg.train.chunk_size, entropy_coef=s.entropy_coef,
        )  # fmt: skip
    s.engine.update_weights(s.model)
    train_s = time.perf_counter() - t0
    metrics.update(
        {**adv_metrics, **upd, "time/train_s": train_s, "throughput/train_tok_s": tokens / train_s}
    )
    metrics["lr"] = s.scheduler.get_last_lr()[0]
    observed = metrics.get("kl/seq_sum", metrics.get("kl/rollout_seq_mean"))
    if observed is not None:
        s.kl.update(observed, int(data["valid"].shape[0]))
    metrics["kl_coef"] = s.kl.coef
    metrics["entropy_coef"] = s.entropy_coef
    ec = algo.entropy_control
    if ec is not None and "pg/entropy" in metrics:
        s.entropy_coef = adaptive_entropy_coef(
            s.entropy_coef, metrics["pg/entropy"], low=ec.low, high=ec.high, delta=ec.delta,
            coef_min=ec.coef_min, coef_max=ec.coef_max,
        )  # fmt: skip
    return metrics


# ---------------------------------------------------------------- the run


def checkpoint(s: Session, step: int, sampler_state: dict) -> Path:
    state = {
        "sampler": sampler_state,
        "kl_coef": s.kl.coef,
        "entropy_coef": s.entropy_coef,
        "rollout_seed": rollout_seed(s.cfg.seed, step, 0),
        "anomaly": s.guard.state_dict() if s.guard is not None else None,
    }
    keep = s.cfg.train.keep_last  # several processes: rank 0 writes (the weights are replicated)
    return on_main(lambda: save_checkpoint(s.run.dir, step, s.module, s.optimizer, s.scheduler, state, keep))


def restore(s: Session, path: Path) -> dict:
    """Load a checkpoint into the session (policy, optimiser, scheduler, sampler, KL and entropy
    coefficients); returns its saved state (resume and rollback both use it)."""
    state = load_checkpoint(path, s.module, s.optimizer, s.scheduler)
    s.step, s.sampler.state, s.kl.coef = state["step"], state["sampler"], state["kl_coef"]
    s.entropy_coef = state.get("entropy_coef", s.entropy_coef)
    return state


def rollback(s: Session, lr_factor: float) -> int | None:
    """Restore the newest checkpoint (policy, optimiser, sampler, KL state, detector history) and
    scale the learning rate by ``lr_factor``; its step, or None when there is no checkpoint."""
    path = latest_checkpoint(s.run.dir)
    if path is None:
        return None
    s.guard.restore_history(restore(s, path))
    scale_lr(s.optimizer, s.scheduler, lr_factor)
    s.engine.update_weights(s.model)
    s.run.logger.rewind(s.step)
    return s.step


def _on_anomaly(s: Session, exc: TrainingAnomaly, step: int, sampler_before: dict) -> None:
    """Stop with a checkpoint of the last good state: this step's start if no update was applied."""
    from posttrain.train.checkpoint import latest_checkpoint

    if getattr(exc, "applied", 0) == 0:
        exc.message += f"; the last good state is checkpoint {checkpoint(s, step - 1, sampler_before)}"
    else:
        exc.message += f"; resume from the last checkpoint ({latest_checkpoint(s.run.dir) or 'none yet'})"


def run_rl(cfg: RLRecipe, model=None, tokenizer=None) -> Path:
    """Train and export the policy; returns the exported `final/` folder."""
    s = setup(cfg, model, tokenizer)
    tc, results, warned = cfg.train, {}, {}
    evaluate = build_evaluator(s, results)
    if evaluate is not None and cfg.eval.before and s.run.resume_from is None:
        evaluate_on_main(evaluate, results, 0)  # the baseline the reward-hacking check compares with
        s.guard.monitor.update(0, {f"eval/{k}": v for k, v in results[0].items()})
    with progress_bar(tc.max_steps, "rl", disable=not is_main()) as bar, StopRequest() as stop:
        task = bar.add_task("rl", total=tc.max_steps, completed=s.step, stats="")
        while s.step < tc.max_steps:
            step, before = s.step + 1, dict(s.sampler.state)
            t0 = time.perf_counter()
            try:
                metrics = train_step(s, step)
            except TrainingAnomaly as exc:
                _on_anomaly(s, exc, step, before)
                raise
            s.step = step
            maybe_kill("after-step", step)
            metrics["time/step_s"] = time.perf_counter() - t0
            for kind, message in alarms(metrics, tc.alarm_kl, tc.alarm_clipped).items():
                metrics[f"alarm/{kind}"] = 1.0
                if step - warned.get(kind, -ALARM_EVERY) >= ALARM_EVERY:  # not every step
                    console.print(f"[yellow]step {step}: {message}[/yellow]")
                    warned[kind] = step
            if step % tc.log_every == 0 or step == tc.max_steps:
                s.run.logger.log(step, metrics)
            stats = f"reward {metrics['reward/total_mean']:.3f}  len {metrics['response/length_mean']:.0f}"
            bar.update(task, completed=step, stats=stats)
            if evaluate is not None and (
                (tc.eval_every and step % tc.eval_every == 0) or step == tc.max_steps
            ):
                evaluate_on_main(evaluate, results, step)
                metrics.update({f"eval/{k}": v for k, v in results[step].items()})
            restored = s.guard.check(step, metrics, lambda: checkpoint(s, s.step, s.sampler.state),
                                     lambda factor: rollback(s, factor))  # fmt: skip
            if restored is not None:
                bar.update(task, completed=restored)
                continue
            stopping = stop_agreed(stop.signum)  # every rank stops after the same step
            if (tc.save_every and step % tc.save_every == 0) or step == tc.max_steps or stopping:
                saved = checkpoint(s, step, s.sampler.state)
            if stopping and step < tc.max_steps:  # SIGINT / SIGTERM: saved above, now stop
                s.run.logger.close()
                raise RunInterrupted(stop.signum or signal.SIGTERM, step, str(saved))
    final = on_main(lambda: _export(s, results)) or Path(cfg.output_dir) / "final"
    s.run.finish(final)
    if hasattr(s.engine, "shutdown"):  # Ray actors and their placement group
        s.engine.shutdown()
    return final


def _export(s: Session, results: dict) -> Path:
    """eval_summary.json, final/ (and PPO's critic head, for continuing or inspecting the run)."""
    from posttrain.models.peft import export_model

    if results:
        summary = json.dumps({str(k): v for k, v in results.items()}, indent=1)
        (s.run.dir / "eval_summary.json").write_text(summary)
    final = export_model(s.model, s.run.tokenizer, Path(s.cfg.output_dir) / "final", s.cfg.peft)
    if s.value_head is not None:
        from posttrain.models.heads import save_value_head

        save_value_head(s.value_head, final)
    return final


def rl_main(recipe_path: str | None, overrides: list[str]) -> Path:
    """CLI entry: `posttrain rl RECIPE.yaml [key=value ...]`."""
    from posttrain.config import load_recipe
    from posttrain.distributed.launch import run_command

    return run_command("rl", recipe_path, overrides, load_recipe(RLRecipe, recipe_path, overrides), run_rl)
